#include "client/tool/experiment_spec.h"

#include <toml++/toml.h>

#include <algorithm>
#include <limits>
#include <sstream>

#include "common/aggregation/aggregate.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::tool {

using common::StrCat;
namespace fs = std::filesystem;

namespace {

// One table of the spec: typed reads, and a refusal of keys it does not know.
class Section {
 public:
  Section(const toml::table* table, std::string name) : table_(table), name_(std::move(name)) {}

  absl::Status Check(std::initializer_list<std::string_view> known) const {
    if (table_ == nullptr) return absl::OkStatus();
    for (const auto& [key, value] : *table_) {
      if (std::find(known.begin(), known.end(), key.str()) == known.end()) {
        return absl::InvalidArgumentError(StrCat("[", name_, "] has no key \"", key.str(),
                                                 "\"; it takes ", common::StrJoin(known, ", ")));
      }
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::Status Get(std::string_view key, T& out) const {
    const toml::node* node = table_ ? table_->get(key) : nullptr;
    if (node == nullptr) return absl::OkStatus();
    auto value = Value<T>(*node);
    if (!value) return Wrong(key, *node);
    out = *value;
    return absl::OkStatus();
  }

  // A list, or one value taken as a list of one.
  template <typename T>
  absl::Status GetList(std::string_view key, std::vector<T>& out) const {
    const toml::node* node = table_ ? table_->get(key) : nullptr;
    if (node == nullptr) return absl::OkStatus();
    std::vector<T> values;
    if (const toml::array* array = node->as_array()) {
      for (const toml::node& element : *array) {
        auto value = Value<T>(element);
        if (!value) return Wrong(key, element);
        values.push_back(*value);
      }
    } else if (auto value = Value<T>(*node)) {
      values.push_back(*value);
    } else {
      return Wrong(key, *node);
    }
    if (values.empty()) return absl::InvalidArgumentError(StrCat(Where(key), " is empty"));
    out = std::move(values);
    return absl::OkStatus();
  }

  const toml::table* table() const { return table_; }

 private:
  template <typename T>
  static std::optional<T> Value(const toml::node& node) {
    if constexpr (std::is_same_v<T, double>) {
      if (node.is_integer()) return static_cast<double>(*node.value<int64_t>());
      return node.value_exact<double>();
    } else if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
      auto v = node.value_exact<int64_t>();
      if (!v || *v < 0 || *v > static_cast<int64_t>(std::numeric_limits<int>::max()))
        return std::nullopt;
      return static_cast<T>(*v);
    } else {
      return node.value_exact<T>();
    }
  }
  std::string Where(std::string_view key) const { return StrCat("[", name_, "] ", key); }
  absl::Status Wrong(std::string_view key, const toml::node& node) const {
    std::ostringstream got;
    node.visit([&](auto&& n) { got << n; });
    return absl::InvalidArgumentError(StrCat(Where(key), " has the wrong type or range: ",
                                             got.str(), " (line ", node.source().begin.line, ")"));
  }

  const toml::table* table_;
  std::string name_;
};

Section SectionOf(const toml::table& root, const char* name) {
  return Section(root[name].as_table(), name);
}

absl::Status ReadHyper(const Section& s, Hyper& h) {
  RETURN_IF_ERROR(s.Get("rank", h.rank));
  RETURN_IF_ERROR(s.Get("lora_alpha", h.lora_alpha));
  RETURN_IF_ERROR(s.Get("learning_rate", h.learning_rate));
  RETURN_IF_ERROR(s.Get("fed_sb_init_lr", h.fed_sb_init_lr));
  if (h.rank < 1 || !(h.lora_alpha > 0) || !(h.learning_rate > 0) || !(h.fed_sb_init_lr > 0))
    return absl::InvalidArgumentError(
        "rank, lora_alpha, learning_rate and fed_sb_init_lr must be positive");
  return absl::OkStatus();
}

// [model]: a preset made here, or a model directory (relative to the spec's directory `base`).
absl::Status ReadModel(const toml::table& root, const fs::path& base, ExperimentSpec& s) {
  const Section model = SectionOf(root, "model");
  RETURN_IF_ERROR(model.Check({"preset", "dir", "seed", "init_std", "merges"}));
  std::string model_dir;
  RETURN_IF_ERROR(model.Get("preset", s.preset));
  RETURN_IF_ERROR(model.Get("dir", model_dir));
  if (!model_dir.empty()) s.model_dir = base / model_dir;
  RETURN_IF_ERROR(model.Get("seed", s.model_seed));
  RETURN_IF_ERROR(model.Get("init_std", s.init_std));
  RETURN_IF_ERROR(model.Get("merges", s.merges));
  if (s.preset.empty() == s.model_dir.empty())
    return absl::InvalidArgumentError(
        "[model] takes preset (a model made here) or dir, one of them");
  return absl::OkStatus();
}

// [data]: synthetic, or train and test files of a directory; and the partition.
absl::Status ReadData(const toml::table& root, const fs::path& base, ExperimentSpec& s) {
  const Section data = SectionOf(root, "data");
  RETURN_IF_ERROR(
      data.Check({"synthetic", "records_per_client", "test_records", "dir", "train", "test",
                  "partition", "label_field", "max_train_records", "max_test_records"}));
  std::string data_dir;
  RETURN_IF_ERROR(data.Get("synthetic", s.synthetic));
  RETURN_IF_ERROR(data.Get("records_per_client", s.synthetic_records));
  RETURN_IF_ERROR(data.Get("test_records", s.synthetic_test_records));
  RETURN_IF_ERROR(data.Get("dir", data_dir));
  if (!data_dir.empty()) s.data_dir = base / data_dir;
  RETURN_IF_ERROR(data.GetList("train", s.train_files));
  RETURN_IF_ERROR(data.GetList("test", s.test_files));
  RETURN_IF_ERROR(data.Get("partition", s.partition));
  RETURN_IF_ERROR(data.Get("label_field", s.label_field));
  RETURN_IF_ERROR(data.Get("max_train_records", s.max_train_records));
  RETURN_IF_ERROR(data.Get("max_test_records", s.max_test_records));
  if (s.synthetic == !s.data_dir.empty())
    return absl::InvalidArgumentError("[data] takes synthetic = true, or dir with train and test");
  if (!s.synthetic && (s.train_files.empty() || s.test_files.empty()))
    return absl::InvalidArgumentError("[data] dir needs train and test (file names in it)");
  if (s.partition != "dirichlet" && s.partition != "per-file")
    return absl::InvalidArgumentError(
        StrCat("[data] partition is \"", s.partition, "\"; use \"dirichlet\" or \"per-file\""));
  if (s.partition == "per-file" && s.synthetic)
    return absl::InvalidArgumentError("[data] partition \"per-file\" needs files (dir, train)");
  return absl::OkStatus();
}

// [grid] flora_client_ranks: a list of rank lists.
absl::Status ReadFloraClientRanks(const toml::node& patterns, ExperimentSpec& s) {
  const toml::array* list = patterns.as_array();
  if (list == nullptr || list->empty())
    return absl::InvalidArgumentError(
        "[grid] flora_client_ranks is a list of rank lists, e.g. [[2, 4, 8, 16]]");
  for (const toml::node& pattern : *list) {
    std::vector<int> ranks;
    const toml::array* values = pattern.as_array();
    if (values == nullptr || values->empty())
      return absl::InvalidArgumentError(
          "[grid] flora_client_ranks: each entry is a non-empty list of ranks, e.g. [2, 4]");
    for (const toml::node& r : *values) {
      const auto rank = r.value_exact<int64_t>();
      if (!rank || *rank < 1 || *rank > 65536)
        return absl::InvalidArgumentError(
            StrCat("[grid] flora_client_ranks: ranks are integers 1 to 65536 (line ",
                   r.source().begin.line, ")"));
      ranks.push_back(static_cast<int>(*rank));
    }
    s.flora_client_ranks.push_back(std::move(ranks));
  }
  if (std::find(s.methods.begin(), s.methods.end(), "flora") == s.methods.end())
    return absl::InvalidArgumentError("[grid] flora_client_ranks needs flora in methods");
  return absl::OkStatus();
}

// The values of [grid] (read into `s`) checked, and made to fit the partition.
absl::Status CheckGrid(const Section& grid, ExperimentSpec& s) {
  for (const std::string& m : s.methods)
    if (!common::ParseMethod(m).ok())
      return absl::InvalidArgumentError(
          StrCat("[grid] methods: \"", m, "\" is not fedit, flora, lora-fair or fed-sb"));
  if (s.partition == "per-file") {
    if (grid.table() && (grid.table()->contains("clients") || grid.table()->contains("alpha")))
      return absl::InvalidArgumentError(
          "[grid] clients and alpha do not apply to partition \"per-file\": each train file is a "
          "client");
    s.clients = {static_cast<int>(s.train_files.size())};
    s.alphas = {0};
  }
  for (int k : s.clients)
    if (k < 1 || k > 1000)
      return absl::InvalidArgumentError(StrCat("[grid] clients: ", k, " is not in 1..1000"));
  for (double a : s.alphas)
    if (s.partition == "dirichlet" && !(a > 0))
      return absl::InvalidArgumentError(StrCat("[grid] alpha: ", a, " is not positive"));
  for (double z : s.dp_noise)
    if (!(z >= 0))
      return absl::InvalidArgumentError(StrCat("[grid] dp_noise_multiplier: ", z, " is negative"));
  if (s.rounds < 1 || s.local_steps < 1)
    return absl::InvalidArgumentError("[grid] rounds and local_steps must be at least 1");
  return absl::OkStatus();
}

absl::Status ReadGrid(const toml::table& root, ExperimentSpec& s) {
  const Section grid = SectionOf(root, "grid");
  RETURN_IF_ERROR(grid.Check({"methods", "seeds", "clients", "alpha", "dp_noise_multiplier",
                              "flora_client_ranks", "rounds", "local_steps"}));
  s.methods = {"fedit", "flora", "lora-fair", "fed-sb"};
  RETURN_IF_ERROR(grid.GetList("methods", s.methods));
  RETURN_IF_ERROR(grid.GetList("seeds", s.seeds));
  RETURN_IF_ERROR(grid.GetList("clients", s.clients));
  RETURN_IF_ERROR(grid.GetList("alpha", s.alphas));
  RETURN_IF_ERROR(grid.GetList("dp_noise_multiplier", s.dp_noise));
  if (const toml::node* patterns = grid.table() ? grid.table()->get("flora_client_ranks") : nullptr)
    RETURN_IF_ERROR(ReadFloraClientRanks(*patterns, s));
  RETURN_IF_ERROR(grid.Get("rounds", s.rounds));
  RETURN_IF_ERROR(grid.Get("local_steps", s.local_steps));
  return CheckGrid(grid, s);
}

// [train], and [method.<name>]'s overrides of its hyper-parameters for a method of the grid.
absl::Status ReadTrain(const toml::table& root, ExperimentSpec& s) {
  const Section train = SectionOf(root, "train");
  RETURN_IF_ERROR(train.Check({"targets", "batch", "max_length", "eval_max_new_tokens", "dp_clip",
                               "rank", "lora_alpha", "learning_rate", "fed_sb_init_lr"}));
  RETURN_IF_ERROR(train.GetList("targets", s.targets));
  RETURN_IF_ERROR(train.Get("batch", s.batch));
  RETURN_IF_ERROR(train.Get("max_length", s.max_length));
  RETURN_IF_ERROR(train.Get("eval_max_new_tokens", s.eval_max_new_tokens));
  RETURN_IF_ERROR(train.Get("dp_clip", s.dp_clip));
  RETURN_IF_ERROR(ReadHyper(train, s.train));
  if (s.batch < 1 || s.max_length < 2 || s.eval_max_new_tokens < 1 || !(s.dp_clip > 0))
    return absl::InvalidArgumentError(
        "[train] batch, eval_max_new_tokens and dp_clip must be positive, max_length ≥ 2");
  const toml::table* methods = root["method"].as_table();
  if (methods == nullptr) return absl::OkStatus();
  for (const auto& [name, table] : *methods) {
    const std::string method(name.str());
    if (std::find(s.methods.begin(), s.methods.end(), method) == s.methods.end())
      return absl::InvalidArgumentError(
          StrCat("[method.", method, "] names a method the grid does not run"));
    const Section m(table.as_table(), "method." + method);
    RETURN_IF_ERROR(m.Check({"rank", "lora_alpha", "learning_rate", "fed_sb_init_lr"}));
    Hyper h = s.train;
    RETURN_IF_ERROR(ReadHyper(m, h));
    s.per_method[method] = h;
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ExperimentSpec> ReadExperimentSpec(const fs::path& path) {
  toml::table root;
  try {
    root = toml::parse_file(path.string());
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(StrCat(path.string(), ":", e.source().begin.line, ":",
                                             e.source().begin.column, ": ", e.description()));
  }
  const fs::path base = fs::absolute(path).parent_path();
  ExperimentSpec s;
  s.name = path.stem().string();
  const Section top(&root, "top level");
  RETURN_IF_ERROR(
      top.Check({"name", "out", "model", "data", "grid", "train", "method", "baselines"}));
  RETURN_IF_ERROR(top.Get("name", s.name));
  std::string out;
  RETURN_IF_ERROR(top.Get("out", out));
  s.out = out.empty() ? fs::path("out/experiments") / s.name : fs::path(out);
  RETURN_IF_ERROR(ReadModel(root, base, s));
  RETURN_IF_ERROR(ReadData(root, base, s));
  RETURN_IF_ERROR(ReadGrid(root, s));
  RETURN_IF_ERROR(ReadTrain(root, s));

  toml::table settings = root;
  settings.erase("grid");
  std::ostringstream text;
  text << settings << "\n";
  s.settings = text.str();

  const Section baselines = SectionOf(root, "baselines");
  RETURN_IF_ERROR(baselines.Check({"centralised", "local"}));
  RETURN_IF_ERROR(baselines.Get("centralised", s.centralised));
  RETURN_IF_ERROR(baselines.Get("local", s.local));
  return s;
}

std::string Cell::id() const {
  std::string id = StrCat(kind, "_s", seed, "_k", clients, "_", split);
  if (dp_noise > 0) id += StrCat("_dp", dp_noise);
  if (!client_ranks.empty()) id += "_r" + common::StrJoin(client_ranks, "-");
  if (site > 0) id += StrCat("_site", site);
  return id;
}

std::vector<Cell> GridCells(const ExperimentSpec& s) {
  std::vector<Cell> cells;
  for (uint64_t seed : s.seeds)
    for (int k : s.clients)
      for (double alpha : s.alphas) {
        const std::string split =
            s.partition == "per-file" ? "per-file" : StrCat("dirichlet", alpha);
        for (const std::string& method : s.methods)
          for (double z : s.dp_noise) {
            if (method == "flora" && z > 0) continue;  // the coordinator refuses it
            cells.push_back({method, seed, k, split, alpha, z, {}, 0});
          }
        for (const std::vector<int>& pattern : s.flora_client_ranks) {
          std::vector<int> ranks;
          for (int i = 0; i < k; ++i) ranks.push_back(pattern[i % pattern.size()]);
          cells.push_back({"flora", seed, k, split, alpha, 0, ranks, 0});
        }
        if (s.centralised) cells.push_back({"centralised", seed, k, split, alpha, 0, {}, 0});
        if (s.local)
          for (int site = 1; site <= k; ++site)
            cells.push_back({"local", seed, k, split, alpha, 0, {}, site});
      }
  return cells;
}

}  // namespace fedlora::tool
