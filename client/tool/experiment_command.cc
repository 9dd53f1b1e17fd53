// `fedlora experiment SPEC`: see experiment.h. Every federation is real: fedlora-server and one
// fedlora-client per site, started from this program's directory, over mutual TLS on loopback
// with certificates made here (common/net/certs.h). The base model and the data split are made by
// this program's own `init-model` and by the partition below. Each finished cell leaves
// cells/<id>/result.json (atomically), so a run that is stopped resumes where it was: finished
// cells are not run again, an unfinished one starts over.
#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <toml++/toml.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <thread>

#include "client/tool/commands.h"
#include "client/tool/experiment.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/dataset.h"
#include "common/net/certs.h"
#include "common/run/ledger.h"
#include "common/run/records.h"

namespace fedlora::tool {

using common::StrCat;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// The spec

namespace {

// One table of the spec: typed reads, and a refusal of keys it does not know.
class Section {
 public:
  Section(const toml::table* table, std::string name) : table_(table), name_(std::move(name)) {}

  absl::Status Check(std::initializer_list<std::string_view> known) const {
    if (table_ == nullptr) return absl::OkStatus();
    for (const auto& [key, value] : *table_) {
      if (std::find(known.begin(), known.end(), key.str()) == known.end()) {
        std::string list;
        for (std::string_view k : known) list += (list.empty() ? "" : ", ") + std::string(k);
        return absl::InvalidArgumentError(
            StrCat("[", name_, "] has no key \"", key.str(), "\"; it takes ", list));
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
  auto resolve = [&](const std::string& p) { return p.empty() ? fs::path() : base / p; };
  ExperimentSpec s;
  s.name = path.stem().string();
  const Section top(&root, "top level");
  RETURN_IF_ERROR(
      top.Check({"name", "out", "model", "data", "grid", "train", "method", "baselines"}));
  RETURN_IF_ERROR(top.Get("name", s.name));
  std::string out;
  RETURN_IF_ERROR(top.Get("out", out));
  s.out = out.empty() ? fs::path("out/experiments") / s.name : fs::path(out);

  const Section model = SectionOf(root, "model");
  RETURN_IF_ERROR(model.Check({"preset", "dir", "seed", "init_std", "merges"}));
  std::string model_dir;
  RETURN_IF_ERROR(model.Get("preset", s.preset));
  RETURN_IF_ERROR(model.Get("dir", model_dir));
  s.model_dir = resolve(model_dir);
  RETURN_IF_ERROR(model.Get("seed", s.model_seed));
  RETURN_IF_ERROR(model.Get("init_std", s.init_std));
  RETURN_IF_ERROR(model.Get("merges", s.merges));
  if (s.preset.empty() == s.model_dir.empty())
    return absl::InvalidArgumentError(
        "[model] takes preset (a model made here) or dir, one of them");

  const Section data = SectionOf(root, "data");
  RETURN_IF_ERROR(
      data.Check({"synthetic", "records_per_client", "test_records", "dir", "train", "test",
                  "partition", "label_field", "max_train_records", "max_test_records"}));
  std::string data_dir;
  RETURN_IF_ERROR(data.Get("synthetic", s.synthetic));
  RETURN_IF_ERROR(data.Get("records_per_client", s.synthetic_records));
  RETURN_IF_ERROR(data.Get("test_records", s.synthetic_test_records));
  RETURN_IF_ERROR(data.Get("dir", data_dir));
  s.data_dir = resolve(data_dir);
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

  const Section grid = SectionOf(root, "grid");
  RETURN_IF_ERROR(grid.Check({"methods", "seeds", "clients", "alpha", "dp_noise_multiplier",
                              "flora_client_ranks", "rounds", "local_steps"}));
  s.methods = {"fedit", "flora", "lora-fair", "fed-sb"};
  RETURN_IF_ERROR(grid.GetList("methods", s.methods));
  RETURN_IF_ERROR(grid.GetList("seeds", s.seeds));
  RETURN_IF_ERROR(grid.GetList("clients", s.clients));
  RETURN_IF_ERROR(grid.GetList("alpha", s.alphas));
  RETURN_IF_ERROR(grid.GetList("dp_noise_multiplier", s.dp_noise));
  if (const toml::node* patterns =
          grid.table() ? grid.table()->get("flora_client_ranks") : nullptr) {
    const toml::array* list = patterns->as_array();
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
  }
  RETURN_IF_ERROR(grid.Get("rounds", s.rounds));
  RETURN_IF_ERROR(grid.Get("local_steps", s.local_steps));
  for (const std::string& m : s.methods)
    if (m != "fedit" && m != "flora" && m != "lora-fair" && m != "fed-sb")
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
  if (const toml::table* methods = root["method"].as_table()) {
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
  }

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
  if (!client_ranks.empty()) {
    id += "_r";
    for (size_t i = 0; i < client_ranks.size(); ++i) id += StrCat(i ? "-" : "", client_ranks[i]);
  }
  if (site > 0) id += StrCat("_site", site);
  return id;
}

// ---------------------------------------------------------------------------------------------
// Processes

namespace {

// A child process (found on PATH unless the name has a slash) with stdout and stderr in `log`;
// it is sent SIGTERM if this program dies.
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const fs::path& log,
                            const fs::path& cwd = {}) {
  const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::InternalError(StrCat("cannot write ", log.string()));
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  const pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (!cwd.empty() && ::chdir(cwd.c_str()) != 0) ::_exit(126);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execvp(args[0], args.data());
    std::fprintf(stderr, "cannot run %s: %s\n", args[0], std::strerror(errno));
    ::_exit(127);
  }
  ::close(fd);
  if (pid < 0) return absl::InternalError(StrCat("cannot start ", argv[0]));
  return pid;
}

std::string Tail(const fs::path& log) {
  const std::string text = common::ReadFileToString(log).value_or("");
  return text.size() > 1500 ? "…" + text.substr(text.size() - 1500) : text;
}

}  // namespace

absl::Status RunToEnd(const std::vector<std::string>& argv, const fs::path& log,
                      const fs::path& cwd) {
  ASSIGN_OR_RETURN(pid_t pid, Spawn(argv, log, cwd));
  int status = 0;
  ::waitpid(pid, &status, 0);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return absl::OkStatus();
  return absl::InternalError(
      StrCat(fs::path(argv[0]).filename().string(), " failed (", log.string(), "):\n", Tail(log)));
}

namespace {

std::string Number(double x) { return StrCat(x); }

std::string Clock(double seconds) {
  const int s = static_cast<int>(seconds);
  return s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
                   : fmt::format("{}:{:02}", s / 60, s % 60);
}

// ---------------------------------------------------------------------------------------------
// Data

struct Record {
  std::string line;   // the JSON object, as read
  std::string label;  // the partition's label
};

// The records of a JSONL file (a fixed random subset of `limit` when limit > 0 and fewer than
// the file has: the same for every cell and seed). With `tag_task`, a record without a "task" or
// "category" gets "task": the file's name without "-test" (held-out records, for the
// coordinator's accuracy per task).
absl::StatusOr<std::vector<Record>> ReadRecords(const fs::path& path,
                                                const std::string& label_field, int limit,
                                                bool tag_task = false) {
  std::string task = path.stem().string();
  if (task.ends_with("-test") || task.ends_with("_test")) task.resize(task.size() - 5);
  std::vector<Record> records;
  RETURN_IF_ERROR(common::ForEachJsonRecord(
      path, [&](const nlohmann::json& r, const std::string& where) -> absl::Status {
        if (!r.is_object()) return absl::InvalidArgumentError(where + ": expected a JSON object");
        std::string label = path.filename().string();
        if (auto it = r.find(label_field); it != r.end())
          label = it->is_string() ? it->get<std::string>() : it->dump();
        if (!tag_task || r.contains("task") || r.contains("category")) {
          records.push_back({r.dump(), std::move(label)});
          return absl::OkStatus();
        }
        nlohmann::json tagged = r;
        tagged["task"] = task;
        records.push_back({tagged.dump(), std::move(label)});
        return absl::OkStatus();
      }));
  if (records.empty()) return absl::InvalidArgumentError(StrCat(path.string(), " has no records"));
  if (limit > 0 && static_cast<size_t>(limit) < records.size()) {
    std::mt19937_64 rng(0);
    std::shuffle(records.begin(), records.end(), rng);
    records.resize(static_cast<size_t>(limit));
  }
  return records;
}

std::string Lines(const std::vector<Record>& records) {
  std::string text;
  for (const Record& r : records) text += r.line + "\n";
  return text;
}

// Hsu et al. (2019)'s non-IID split: for each label, the clients' shares ~ Dirichlet(α), its
// records (shuffled) cut at the cumulative shares. Drawn again (up to 100 times) until every
// client holds at least `min_records`.
absl::StatusOr<std::vector<std::vector<Record>>> DirichletSplit(const std::vector<Record>& pool,
                                                                int clients, double alpha,
                                                                size_t min_records, uint64_t seed) {
  std::map<std::string, std::vector<const Record*>> by_label;
  for (const Record& r : pool) by_label[r.label].push_back(&r);
  std::mt19937_64 rng(seed);
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::vector<std::vector<Record>> split(static_cast<size_t>(clients));
    for (auto& [label, records] : by_label) {
      std::gamma_distribution<double> gamma(alpha, 1.0);
      std::vector<double> share(static_cast<size_t>(clients));
      double total = 0;
      for (double& x : share) total += x = gamma(rng);
      std::vector<const Record*> order = records;
      std::shuffle(order.begin(), order.end(), rng);
      double cumulative = 0;
      size_t begin = 0;
      for (int k = 0; k < clients; ++k) {
        cumulative += total > 0 ? share[k] / total : 1.0 / clients;
        const size_t end =
            k + 1 == clients
                ? order.size()
                : std::min(order.size(),
                           static_cast<size_t>(std::llround(cumulative * order.size())));
        for (size_t i = begin; i < end; ++i) split[k].push_back(*order[i]);
        begin = std::max(begin, end);
      }
    }
    if (std::all_of(split.begin(), split.end(),
                    [&](const auto& part) { return part.size() >= min_records; }))
      return split;
  }
  return absl::InvalidArgumentError(StrCat("no Dirichlet(", alpha, ") split of ", pool.size(),
                                           " records over ", clients,
                                           " clients gave each at least ", min_records,
                                           " (one batch) in 100 draws; use more "
                                           "records or a larger alpha"));
}

// ---------------------------------------------------------------------------------------------
// The runner

class Runner {
 public:
  explicit Runner(ExperimentSpec spec) : s_(std::move(spec)) {
    bin_ = fs::read_symlink("/proc/self/exe").parent_path();
  }

  absl::Status Run(bool report_only);

 private:
  struct Split {
    std::vector<fs::path> clients;
    fs::path pooled;
  };
  absl::Status Prepare();
  absl::StatusOr<Split> SplitFor(uint64_t seed, int clients, double alpha);
  std::vector<Cell> Cells() const;
  // Runs a cell's federation, or reads its rows when it finished before.
  absl::StatusOr<std::vector<ResultRow>> RunCell(const Cell& cell, size_t index, size_t total);
  // Runs a coordinator and a client per data file in `dir` to the end of the run.
  absl::Status Federation(const Cell& cell, const std::vector<fs::path>& data,
                          const std::string& method, int local_steps, const fs::path& dir,
                          const std::string& label);

  ExperimentSpec s_;
  fs::path bin_, model_, test_;
  std::vector<std::vector<Record>> train_;  // per train file (one pool when synthetic)
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  double run_seconds_ = 0;  // spent on cells run by this process
  int cells_run_ = 0;
};

absl::Status Runner::Prepare() {
  const fs::path data = s_.out / "data";
  fs::create_directories(data);
  std::vector<Record> test;
  if (s_.synthetic) {
    // One pool of uniform categories (a huge α) for the split below to skew.
    const int most = *std::max_element(s_.clients.begin(), s_.clients.end());
    const fs::path pool = data / "synthetic";
    if (!fs::exists(pool / "test.jsonl"))
      RETURN_IF_ERROR(RunToEnd(
          {(bin_ / "fedlora").string(), "make-data", "--out", pool.string(), "--clients", "1",
           "--records", StrCat(most * s_.synthetic_records), "--test-records",
           StrCat(s_.synthetic_test_records), "--alpha", "1000", "--seed", StrCat(s_.model_seed)},
          data / "make-data.log"));
    ASSIGN_OR_RETURN(auto records, ReadRecords(pool / "client-1.jsonl", s_.label_field, 0));
    train_.push_back(std::move(records));
    ASSIGN_OR_RETURN(test, ReadRecords(pool / "test.jsonl", s_.label_field, 0));
  } else {
    for (const std::string& f : s_.train_files) {
      ASSIGN_OR_RETURN(auto records,
                       ReadRecords(s_.data_dir / f, s_.label_field, s_.max_train_records));
      train_.push_back(std::move(records));
    }
    for (const std::string& f : s_.test_files) {
      ASSIGN_OR_RETURN(auto records,
                       ReadRecords(s_.data_dir / f, s_.label_field, s_.max_test_records, true));
      test.insert(test.end(), records.begin(), records.end());
    }
  }
  test_ = data / "test.jsonl";
  RETURN_IF_ERROR(common::WriteFileAtomically(test_, Lines(test)));
  if (!s_.preset.empty()) {
    model_ = s_.out / "model";
    if (!fs::exists(model_ / "config.json")) {
      std::vector<Record> all;
      for (const auto& file : train_) all.insert(all.end(), file.begin(), file.end());
      const fs::path corpus = data / "corpus.jsonl";
      RETURN_IF_ERROR(common::WriteFileAtomically(corpus, Lines(all)));
      RETURN_IF_ERROR(RunToEnd(
          {(bin_ / "fedlora").string(), "init-model", "--preset", s_.preset, "--seed",
           StrCat(s_.model_seed), "--init-std", Number(s_.init_std), "--merges", StrCat(s_.merges),
           "--tokenizer-corpus", corpus.string(), "--out", model_.string()},
          data / "init-model.log"));
    }
  } else {
    model_ = fs::absolute(s_.model_dir);
  }
  const int most = *std::max_element(s_.clients.begin(), s_.clients.end());
  return common::MakeRunCertificates(s_.out / "certs", most);
}

absl::StatusOr<Runner::Split> Runner::SplitFor(uint64_t seed, int clients, double alpha) {
  const fs::path dir = s_.out / "data" /
                       (s_.partition == "per-file" ? StrCat("per-file")
                                                   : StrCat("s", seed, "_k", clients, "_a", alpha));
  Split split;
  for (int k = 1; k <= clients; ++k) split.clients.push_back(dir / StrCat("client-", k, ".jsonl"));
  split.pooled = dir / "pooled.jsonl";
  if (fs::exists(split.pooled)) return split;
  std::vector<std::vector<Record>> parts;
  if (s_.partition == "per-file") {
    parts = train_;
  } else {
    std::vector<Record> pool;
    for (const auto& file : train_) pool.insert(pool.end(), file.begin(), file.end());
    if (s_.synthetic)
      pool.resize(std::min(pool.size(), static_cast<size_t>(clients) * s_.synthetic_records));
    ASSIGN_OR_RETURN(parts,
                     DirichletSplit(pool, clients, alpha, static_cast<size_t>(s_.batch), seed));
  }
  fs::create_directories(dir);
  std::vector<Record> pooled;
  for (int k = 0; k < clients; ++k) {
    RETURN_IF_ERROR(common::WriteFileAtomically(split.clients[k], Lines(parts[k])));
    pooled.insert(pooled.end(), parts[k].begin(), parts[k].end());
  }
  RETURN_IF_ERROR(common::WriteFileAtomically(split.pooled, Lines(pooled)));  // last: the marker
  return split;
}

std::vector<Cell> Runner::Cells() const {
  std::vector<Cell> cells;
  for (uint64_t seed : s_.seeds)
    for (int k : s_.clients)
      for (double alpha : s_.alphas) {
        const std::string split =
            s_.partition == "per-file" ? "per-file" : StrCat("dirichlet", alpha);
        for (const std::string& method : s_.methods)
          for (double z : s_.dp_noise) {
            if (method == "flora" && z > 0) continue;  // the coordinator refuses: see Run
            cells.push_back({method, seed, k, split, alpha, z, {}, 0});
          }
        for (const std::vector<int>& pattern : s_.flora_client_ranks) {
          std::vector<int> ranks;
          for (int i = 0; i < k; ++i) ranks.push_back(pattern[i % pattern.size()]);
          cells.push_back({"flora", seed, k, split, alpha, 0, ranks, 0});
        }
        if (s_.centralised) cells.push_back({"centralised", seed, k, split, alpha, 0, {}, 0});
        if (s_.local)
          for (int site = 1; site <= k; ++site)
            cells.push_back({"local", seed, k, split, alpha, 0, {}, site});
      }
  return cells;
}

absl::StatusOr<std::vector<ResultRow>> Runner::RunCell(const Cell& cell, size_t index,
                                                       size_t total) {
  const fs::path dir = s_.out / "cells" / cell.id();
  const fs::path result = dir / "result.json";
  const std::string label = StrCat("[", index + 1, "/", total, "] ", cell.id());
  std::vector<ResultRow> rows;
  if (!fs::exists(result)) {
    ASSIGN_OR_RETURN(Split split, SplitFor(cell.seed, cell.clients, cell.alpha));
    fs::remove_all(dir);
    fs::create_directories(dir);
    const auto t0 = std::chrono::steady_clock::now();
    if (cell.kind == "centralised")
      RETURN_IF_ERROR(
          Federation(cell, {split.pooled}, "fedit", s_.local_steps * cell.clients, dir, label));
    else if (cell.kind == "local")
      RETURN_IF_ERROR(
          Federation(cell, {split.clients[cell.site - 1]}, "fedit", s_.local_steps, dir, label));
    else
      RETURN_IF_ERROR(Federation(cell, split.clients, cell.kind, s_.local_steps, dir, label));
    run_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    ++cells_run_;
  }
  // The rows come from the coordinator's files, whether the cell ran now or before.
  ASSIGN_OR_RETURN(const common::Ledger ledger, common::ReadLedger(dir / "state" / "ledger.json"));
  ASSIGN_OR_RETURN(const std::vector<common::MetricsLine> lines,
                   common::ReadMetrics(dir / "state" / "metrics.jsonl"));
  std::map<std::string, double> cumulative;  // per client
  auto add = [&](const common::PerClient& bytes) {
    for (const auto& [id, b] : bytes) cumulative[id] += static_cast<double>(b);
  };
  if (!ledger.versions.empty() && ledger.versions[0].init_record) {
    add(ledger.versions[0].init_record->init_bytes_up);
    add(ledger.versions[0].init_record->init_bytes_down);
  }
  auto mean = [](const common::PerClient& per_client) {
    double sum = 0;
    for (const auto& [id, b] : per_client) sum += static_cast<double>(b);
    return per_client.empty() ? 0.0 : sum / static_cast<double>(per_client.size());
  };
  rows.clear();
  double previous = 0;
  for (const common::MetricsLine& m : lines) {
    if (!m.eval_loss)
      return absl::InternalError(
          StrCat(dir.string(), ": round ", m.record.round, "'s metrics line has no eval_loss"));
    ResultRow r{cell, static_cast<int>(m.record.round), *m.eval_loss};
    r.eval_accuracy = m.eval_accuracy;
    r.accuracy_by_task = m.eval_accuracy_by_task;
    r.bytes_up = mean(m.record.who.bytes_up);
    r.bytes_down = mean(m.record.who.bytes_down);
    add(m.record.who.bytes_up);
    add(m.record.who.bytes_down);
    double sum = 0;
    for (const auto& [id, b] : cumulative) sum += b;
    r.cumulative_bytes = cumulative.empty() ? 0.0 : sum / static_cast<double>(cumulative.size());
    if (m.record.client_dp) {
      r.epsilon = m.record.client_dp->epsilon.value_or(INFINITY);
    } else {
      for (const auto& [id, e] : m.record.dp_epsilon)
        r.epsilon = std::max(r.epsilon.value_or(0.0), e);
    }
    r.wall_seconds = m.record.who.elapsed_seconds;
    r.round_seconds = r.wall_seconds - previous;
    previous = r.wall_seconds;
    rows.push_back(std::move(r));
  }
  if (static_cast<int>(rows.size()) != s_.rounds)
    return absl::InternalError(StrCat(dir.string(), ": ", rows.size(), " rounds in the metrics, ",
                                      s_.rounds, " expected"));
  if (!fs::exists(result))
    RETURN_IF_ERROR(common::WriteFileAtomically(
        result, nlohmann::json({{"cell", cell.id()}, {"rounds", rows.size()}}).dump() + "\n"));
  return rows;
}

absl::Status Runner::Federation(const Cell& cell, const std::vector<fs::path>& data,
                                const std::string& method, int local_steps, const fs::path& dir,
                                const std::string& label) {
  const Hyper h = s_.HyperOf(method);
  const fs::path certs = fs::absolute(s_.out / "certs");
  const int n = static_cast<int>(data.size());
  std::string allowed, targets;
  for (int k = 1; k <= n; ++k) allowed += StrCat(k > 1 ? "," : "", "client-", k);
  for (const std::string& t : s_.targets) targets += (targets.empty() ? "" : ",") + t;
  // clang-format off
  std::vector<std::string> server = {
      (bin_ / "fedlora-server").string(),
      "--method", method, "--rounds", StrCat(s_.rounds), "--seed", StrCat(cell.seed),
      "--min-clients", StrCat(n), "--allowed-clients", allowed,
      "--state-dir", (dir / "state").string(), "--linger-s", "1",
      "--listen", "127.0.0.1:0", "--port-file", (dir / "port").string(),
      "--tls-cert", (certs / "server.pem").string(), "--tls-key", (certs / "server.key").string(),
      "--client-ca", (certs / "ca.pem").string(),
      "--base-model-dir", model_.string(), "--eval-data", fs::absolute(test_).string(),
      "--eval-accuracy", "--eval-max-new-tokens", StrCat(s_.eval_max_new_tokens),
      "--eval-max-length", StrCat(s_.max_length),
      "--target-modules", targets, "--rank", StrCat(h.rank), "--lora-alpha", Number(h.lora_alpha),
      "--local-steps", StrCat(local_steps), "--learning-rate", Number(h.learning_rate)};
  // clang-format on
  if (method == "fed-sb") {
    server.insert(server.end(), {"--fed-sb-init-lr", Number(h.fed_sb_init_lr)});
  }
  if (!cell.client_ranks.empty()) {
    std::string ranks;
    for (size_t k = 0; k < cell.client_ranks.size(); ++k)
      ranks += StrCat(k ? "," : "", "client-", k + 1, "=", cell.client_ranks[k]);
    server.insert(server.end(), {"--client-ranks", ranks});
  }
  if (cell.dp_noise > 0)
    server.insert(server.end(), {"--dp-clip", Number(s_.dp_clip), "--dp-noise-multiplier",
                                 Number(cell.dp_noise)});
  ASSIGN_OR_RETURN(pid_t server_pid, Spawn(server, dir / "server.log"));
  std::vector<pid_t> pids = {server_pid};
  std::vector<fs::path> logs = {dir / "server.log"};
  auto stop_all = [&] {
    for (pid_t p : pids) ::kill(p, SIGTERM);
    for (pid_t p : pids) ::waitpid(p, nullptr, 0);
  };
  std::string port;
  for (int i = 0; i < 600 && port.empty(); ++i) {
    port = common::ReadFileToString(dir / "port").value_or("");
    while (!port.empty() && std::isspace(static_cast<unsigned char>(port.back()))) port.pop_back();
    int status = 0;
    if (port.empty() && ::waitpid(server_pid, &status, WNOHANG) == server_pid) {
      pids.clear();
      return absl::InternalError(
          StrCat(label, ": the coordinator exited (", logs[0].string(), "):\n", Tail(logs[0])));
    }
    if (port.empty()) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (port.empty()) {
    stop_all();
    return absl::InternalError(StrCat(label, ": the coordinator did not listen within 30 s"));
  }
  for (int k = 1; k <= n; ++k) {
    const std::string id = StrCat("client-", k);
    logs.push_back(dir / (id + ".log"));
    // clang-format off
    auto pid = Spawn({(bin_ / "fedlora-client").string(),
                      "--coordinator", "localhost:" + port, "--ca", (certs / "ca.pem").string(),
                      "--cert", (certs / (id + ".pem")).string(),
                      "--key", (certs / (id + ".key")).string(),
                      "--workload", "llm", "--model", model_.string(),
                      "--data", fs::absolute(data[k - 1]).string(), "--batch", StrCat(s_.batch),
                      "--max-length", StrCat(s_.max_length), "--threads", "1"},
                     logs.back());
    // clang-format on
    if (!pid.ok()) {
      stop_all();
      return pid.status();
    }
    pids.push_back(*pid);
  }
  // Wait for every process, showing the rounds as they close.
  std::vector<bool> done(pids.size(), false);
  int shown = -1;
  const auto t0 = std::chrono::steady_clock::now();
  while (!std::all_of(done.begin(), done.end(), [](bool d) { return d; })) {
    for (size_t i = 0; i < pids.size(); ++i) {
      int status = 0;
      if (done[i] || ::waitpid(pids[i], &status, WNOHANG) != pids[i]) continue;
      done[i] = true;
      if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        for (size_t j = 0; j < pids.size(); ++j)
          if (!done[j]) ::kill(pids[j], SIGTERM);
        for (size_t j = 0; j < pids.size(); ++j)
          if (!done[j]) ::waitpid(pids[j], nullptr, 0);
        return absl::InternalError(StrCat(label, ": ", logs[i].filename().string(), " failed (",
                                          logs[i].string(), "):\n", Tail(logs[i])));
      }
    }
    const std::string metrics =
        common::ReadFileToString(dir / "state" / "metrics.jsonl").value_or("");
    const int rounds = static_cast<int>(std::count(metrics.begin(), metrics.end(), '\n'));
    if (rounds != shown) {
      shown = rounds;
      const double cell_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const double total_s =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
      std::string eta;
      if (cells_run_ > 0) eta = StrCat(", about ", Clock(run_seconds_ / cells_run_), " a cell");
      std::fprintf(stderr, "%s: round %d/%d, %s in the cell, %s in all%s\n", label.c_str(), rounds,
                   s_.rounds, Clock(cell_s).c_str(), Clock(total_s).c_str(), eta.c_str());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return absl::OkStatus();
}

absl::Status Runner::Run(bool report_only) {
  fs::create_directories(s_.out);
  // Finished cells are reused only under the same settings: all of the spec but its grid.
  const fs::path settings = s_.out / "settings.toml";
  if (auto before = common::ReadFileToString(settings); before.ok()) {
    if (*before != s_.settings)
      return absl::FailedPreconditionError(
          StrCat(s_.out.string(), " holds cells of other settings (", settings.string(),
                 "); only [grid] may change between runs into one directory: use another out "
                 "(--out) or remove it"));
  } else {
    RETURN_IF_ERROR(common::WriteFileAtomically(settings, s_.settings));
  }
  if (!report_only) RETURN_IF_ERROR(Prepare());
  const std::vector<Cell> cells = Cells();
  if (std::find(s_.methods.begin(), s_.methods.end(), "flora") != s_.methods.end() &&
      std::any_of(s_.dp_noise.begin(), s_.dp_noise.end(), [](double z) { return z > 0; }))
    spdlog::warn(
        "flora runs without client-level DP only (the coordinator needs each client's own "
        "factors to stack them): its DP cells are left out");
  std::vector<ResultRow> rows;
  size_t finished = 0;
  for (size_t i = 0; i < cells.size(); ++i) {
    if (report_only && !fs::exists(s_.out / "cells" / cells[i].id() / "result.json")) continue;
    // ETA from the cells this process ran.
    if (!report_only && cells_run_ > 0)
      std::fprintf(stderr, "[%zu/%zu] ETA %s for the %zu cells left\n", i + 1, cells.size(),
                   Clock(run_seconds_ / cells_run_ * static_cast<double>(cells.size() - i)).c_str(),
                   cells.size() - i);
    ASSIGN_OR_RETURN(auto cell_rows, RunCell(cells[i], i, cells.size()));
    rows.insert(rows.end(), cell_rows.begin(), cell_rows.end());
    ++finished;
  }
  if (rows.empty())
    return absl::FailedPreconditionError(
        StrCat(s_.out.string(), " has no finished cell to report on; run the spec first"));
  RETURN_IF_ERROR(WriteExperimentReport(s_, rows, s_.out));
  std::fprintf(
      stderr, "%zu of %zu cells in %s (%d run now, %s); report in %s\n", finished, cells.size(),
      s_.out.string().c_str(), cells_run_,
      Clock(std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count())
          .c_str(),
      (s_.out / "report.md").string().c_str());
  return absl::OkStatus();
}

}  // namespace

void AddExperimentCommand(CLI::App& app) {
  struct Args {
    std::string spec, out, data_dir, model_dir;
    bool report_only = false;
  };
  auto a = std::make_shared<Args>();
  CLI::App* cmd = app.add_subcommand(
      "experiment",
      "Run a grid of real federations (coordinator and clients on loopback over mutual TLS) and "
      "baselines from a TOML spec; write results.csv, report.md and plots");
  cmd->add_option("spec", a->spec, "TOML spec (experiments/README.md)")->required();
  cmd->add_option("--out", a->out, "results directory (default: the spec's out)");
  cmd->add_option("--data-dir", a->data_dir, "the directory of [data]'s train and test files");
  cmd->add_option("--model-dir", a->model_dir,
                  "a Hugging Face model directory instead of [model]'s (preset or dir)");
  cmd->add_flag("--report-only", a->report_only,
                "rebuild the CSV, report and plots from the finished cells, run nothing");
  cmd->callback([a] {
    auto spec = ReadExperimentSpec(a->spec);
    ExitIfError(spec.status());
    if (!a->out.empty()) spec->out = a->out;
    if (!a->data_dir.empty()) {
      if (spec->synthetic)
        ExitIfError(absl::InvalidArgumentError("--data-dir: the spec's data is synthetic"));
      spec->data_dir = fs::absolute(a->data_dir);
      spec->settings += StrCat("# --data-dir ", spec->data_dir.string(), "\n");
    }
    if (!a->model_dir.empty()) {
      spec->preset.clear();
      spec->model_dir = fs::absolute(a->model_dir);
      spec->settings += StrCat("# --model-dir ", spec->model_dir.string(), "\n");
    }
    Runner runner(std::move(*spec));
    ExitIfError(runner.Run(a->report_only));
  });
}

}  // namespace fedlora::tool
