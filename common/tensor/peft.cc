#include "common/tensor/peft.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>

#include "common/base/file_util.h"
#include "common/base/pcre.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace fs = std::filesystem;
using Json =
    nlohmann::ordered_json;  // Keeps pattern keys in file order: PEFT takes the first match.

namespace {

constexpr std::string_view kPrefix = "base_model.model.";
constexpr std::string_view kSuffixes[] = {".lora_A.weight", ".lora_B.weight", ".lora_R.weight"};

// A rank_pattern or alpha_pattern entry, compiled as PEFT's get_pattern_key matches it:
// re.match(rf"(.*\.)?({key})$", module).
template <typename T>
struct Pattern {
  std::string key;
  Pcre re;
  T value;
};

struct LoraConfig {
  int r = 0;
  double lora_alpha = 0;
  bool use_rslora = false;
  std::string base_model;
  std::vector<Pattern<int>> rank_pattern;
  std::vector<Pattern<double>> alpha_pattern;
};

// Bounds on what a config may ask of the matcher: PEFT's keys are module paths or short patterns.
constexpr size_t kMaxPatternKey = 1024;
constexpr int kMaxRank = 1 << 16;

// The first pattern that matches `module` (PEFT takes the first key in file order). On PCRE2's
// interpreter, which keeps its backtracking on the heap, with a match limit: a pattern that
// backtracks without end ("(a|aa)*c") is refused instead of running for minutes or, in a
// recursive engine, overflowing the stack.
template <typename T>
absl::StatusOr<std::optional<T>> MatchPattern(const std::vector<Pattern<T>>& patterns,
                                              const std::string& module, std::string_view field) {
  if (patterns.empty()) return std::optional<T>();
  RETURN_IF_ERROR(CheckModuleName(module));        // bounds what the matcher is given
  static pcre2_match_context* const limits = [] {  // read-only once made: shared by threads
    pcre2_match_context* c = pcre2_match_context_create(nullptr);
    pcre2_set_match_limit(c, 1'000'000);
    pcre2_set_depth_limit(c, 10'000);
    return c;
  }();
  for (const Pattern<T>& p : patterns) {
    const int rc = pcre2_match(p.re.code, reinterpret_cast<PCRE2_SPTR>(module.data()),
                               module.size(), 0, 0, p.re.match, limits);
    if (rc >= 0) return std::optional<T>(p.value);
    if (rc != PCRE2_ERROR_NOMATCH)
      return absl::InvalidArgumentError(
          StrCat(field, " key '", p.key, "' cannot be matched against module ", module,
                 " within the matcher's limits (it backtracks too much); write the module path, "
                 "or a simpler pattern"));
  }
  return std::optional<T>();
}

absl::StatusOr<LoraConfig> ParseConfig(const fs::path& path, Symlinks symlinks) {
  auto text = ReadFileToString(path, symlinks);
  if (!text.ok()) {
    if (absl::IsNotFound(text.status())) {
      return absl::NotFoundError(StrCat("missing ", path.string(),
                                        ": a PEFT adapter directory holds ", kAdapterConfigFile,
                                        " and ", kAdapterWeightsFile));
    }
    return text.status();
  }
  Json cfg;
  try {
    cfg = Json::parse(*text);
  } catch (const Json::exception& e) {
    return absl::InvalidArgumentError(StrCat(path.string(), ": not valid JSON: ", e.what()));
  }
  auto bad = [&](std::string_view what) {
    return absl::InvalidArgumentError(StrCat(path.string(), ": ", what));
  };
  if (!cfg.is_object()) return bad("expected a JSON object");
  if (!cfg.contains("peft_type") || !cfg["peft_type"].is_string())
    return bad("missing \"peft_type\" (expected \"LORA\")");
  if (cfg["peft_type"] != "LORA") {
    return bad(StrCat("peft_type is ", cfg["peft_type"].dump(),
                      "; fedlora reads LoRA adapters (\"LORA\")"));
  }
  if (cfg.value("use_dora", false) == true)
    return bad("use_dora is set; DoRA adapters are not supported");
  // Integers are range-checked before narrowing: 4294967304 must not be read as 8.
  auto rank = [](const Json& v) {
    return v.is_number_integer() && v.get<int64_t>() > 0 && v.get<int64_t>() <= kMaxRank;
  };
  if (!cfg.contains("r") || !rank(cfg["r"]))
    return bad(StrCat("\"r\" must be an integer in [1, ", kMaxRank, "], got ",
                      cfg.contains("r") ? cfg["r"].dump() : "nothing"));
  if (!cfg.contains("lora_alpha") || !cfg["lora_alpha"].is_number() ||
      !std::isfinite(cfg["lora_alpha"].get<double>()))
    return bad("\"lora_alpha\" must be a finite number");
  LoraConfig out;
  out.r = cfg["r"].get<int>();
  out.lora_alpha = cfg["lora_alpha"].get<double>();
  if (cfg.contains("use_rslora") && !cfg["use_rslora"].is_null()) {
    if (!cfg["use_rslora"].is_boolean()) return bad("\"use_rslora\" must be true or false");
    out.use_rslora = cfg["use_rslora"].get<bool>();
  }
  if (cfg.contains("base_model_name_or_path") && cfg["base_model_name_or_path"].is_string()) {
    out.base_model = cfg["base_model_name_or_path"].get<std::string>();
  }
  for (const char* field : {"rank_pattern", "alpha_pattern"}) {
    if (!cfg.contains(field) || cfg[field].is_null()) continue;
    if (!cfg[field].is_object()) return bad(StrCat("\"", field, "\" must be an object"));
    for (const auto& [key, value] : cfg[field].items()) {
      if (key.size() > kMaxPatternKey)
        return bad(
            StrCat(field, " has a key of ", key.size(), " characters; at most ", kMaxPatternKey));
      // No JIT: the match limits apply to the interpreter.
      absl::StatusOr<Pcre> re =
          CompilePcre("(.*\\.)?(" + key + ")$", PCRE2_ANCHORED | PCRE2_MATCH_INVALID_UTF,
                      /*jit=*/false, StrCat(field, " key"));
      if (!re.ok()) return bad(StrCat(field, " key '", key, "' is not a valid regular expression"));
      if (std::string_view(field) == "rank_pattern") {
        if (!rank(value))
          return bad(StrCat("rank_pattern[\"", key, "\"] must be an integer in [1, ", kMaxRank,
                            "], got ", value.dump()));
        out.rank_pattern.push_back({key, *std::move(re), value.get<int>()});
      } else {
        if (!value.is_number() || !std::isfinite(value.get<double>()))
          return bad(StrCat("alpha_pattern[\"", key, "\"] must be a finite number"));
        out.alpha_pattern.push_back({key, *std::move(re), value.get<double>()});
      }
    }
  }
  return out;
}

std::string RegexEscape(std::string_view text) {
  std::string out;
  for (char c : text) {
    if (std::string_view(".^$|?*+()[]{}\\").find(c) != std::string_view::npos) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

template <typename T>
T MostCommon(const std::vector<T>& values) {
  std::map<T, int> counts;
  for (const T& v : values) ++counts[v];
  return std::max_element(counts.begin(), counts.end(),
                          [](const auto& a, const auto& b) { return a.second < b.second; })
      ->first;
}

}  // namespace

double LoraScaling(double alpha, int rank, bool use_rslora) {
  return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / rank;
}

absl::StatusOr<Adapter> ReadPeftAdapter(const fs::path& dir, Symlinks symlinks) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(
        StrCat(dir.string(), " is not a directory (expected a PEFT adapter directory with ",
               kAdapterConfigFile, " and ", kAdapterWeightsFile, ")"));
  }
  ASSIGN_OR_RETURN(LoraConfig config, ParseConfig(dir / kAdapterConfigFile, symlinks));
  const fs::path weights = dir / kAdapterWeightsFile;
  if (!fs::exists(weights, ec)) {
    std::string hint =
        fs::exists(dir / "adapter_model.bin", ec)
            ? "; adapter_model.bin (pickle) is not read, since loading it can run code: re-save "
              "the adapter with safe_serialization=True"
            : "";
    return absl::NotFoundError(StrCat("missing ", weights.string(), hint));
  }
  ASSIGN_OR_RETURN(SafetensorsFile file, SafetensorsFile::Open(weights, symlinks));
  ASSIGN_OR_RETURN(
      Adapter adapter,
      AdapterFromSafetensors(
          file.view(), weights.string(), [&](const ModuleShape& shape) -> absl::StatusOr<double> {
            ASSIGN_OR_RETURN(std::optional<int> pattern_rank,
                             MatchPattern(config.rank_pattern, shape.name, "rank_pattern"));
            const int config_rank = pattern_rank.value_or(config.r);
            if (config_rank != shape.rank) {
              return absl::InvalidArgumentError(
                  StrCat(weights.string(), ": module ", shape.name, ": tensors have rank ",
                         shape.rank, " but ", kAdapterConfigFile, " says r = ", config_rank,
                         pattern_rank ? " (rank_pattern)" : ""));
            }
            ASSIGN_OR_RETURN(std::optional<double> alpha,
                             MatchPattern(config.alpha_pattern, shape.name, "alpha_pattern"));
            return LoraScaling(alpha.value_or(config.lora_alpha), shape.rank, config.use_rslora);
          }));
  adapter.source = dir.string();
  adapter.base_model = config.base_model;
  return adapter;
}

absl::StatusOr<Adapter> AdapterFromSafetensors(
    const SafetensorsView& view, const std::string& origin,
    const std::function<absl::StatusOr<double>(const ModuleShape&)>& scaling, Adapter reuse) {
  // Group tensors by module; the module order is the file's data order of each module's first
  // tensor.
  struct Parts {
    const TensorInfo* t[3] = {nullptr, nullptr, nullptr};  // A, B, R
  };
  std::vector<std::string> order;
  std::map<std::string, Parts> parts;
  for (const TensorInfo& t : view.tensors()) {
    int kind = -1;
    for (int k = 0; k < 3; ++k) {
      if (t.name.starts_with(kPrefix) && t.name.ends_with(kSuffixes[k]) &&
          t.name.size() > kPrefix.size() + kSuffixes[k].size()) {
        kind = k;
      }
    }
    if (kind < 0) {
      return absl::InvalidArgumentError(
          StrCat(origin, ": unexpected tensor '", t.name,
                 "'; a LoRA adapter holds base_model.model.<module>.lora_A.weight and "
                 ".lora_B.weight (and .lora_R.weight "
                 "for LoRA-SB); modules_to_save, DoRA and embedding adapters are not supported"));
    }
    std::string module =
        t.name.substr(kPrefix.size(), t.name.size() - kPrefix.size() - kSuffixes[kind].size());
    if (!parts.count(module)) order.push_back(module);
    parts[module].t[kind] = &t;
  }
  if (order.empty()) return absl::InvalidArgumentError(StrCat(origin, ": holds no LoRA tensors"));

  std::vector<ModuleShape> shapes;
  for (const std::string& name : order) {
    const Parts& p = parts[name];
    auto where = [&](std::string_view what) {
      return absl::InvalidArgumentError(StrCat(origin, ": module ", name, ": ", what));
    };
    if (p.t[0] == nullptr || p.t[1] == nullptr) {
      return where(
          StrCat("has ", p.t[0] ? "lora_A" : "lora_B", " but no ", p.t[0] ? "lora_B" : "lora_A"));
    }
    const auto& a = p.t[0]->shape;
    const auto& b = p.t[1]->shape;
    if (a.size() != 2 || b.size() != 2) {
      return where(
          StrCat("lora_A ", ShapeString(a), " and lora_B ", ShapeString(b), " must both be 2-D"));
    }
    if (b[1] != a[0]) {
      return where(StrCat("lora_A is ", ShapeString(a), " (rank ", a[0], ") but lora_B is ",
                          ShapeString(b), " (rank ", b[1], "); expected lora_B [m, ", a[0], "]"));
    }
    if (a[0] <= 0 || a[1] <= 0 || b[0] <= 0 || a[0] > INT32_MAX || a[1] > INT32_MAX ||
        b[0] > INT32_MAX) {
      return where(StrCat("lora_A ", ShapeString(a), " and lora_B ", ShapeString(b),
                          " must have positive sizes"));
    }
    if (p.t[2] != nullptr && p.t[2]->shape != std::vector<int64_t>{a[0], a[0]}) {
      return where(
          StrCat("lora_R is ", ShapeString(p.t[2]->shape), "; expected [", a[0], ",", a[0], "]"));
    }
    ModuleShape shape;
    shape.name = name;
    shape.rank = static_cast<int>(a[0]);
    shape.in_features = static_cast<int>(a[1]);
    shape.out_features = static_cast<int>(b[0]);
    shape.has_r = p.t[2] != nullptr;
    ASSIGN_OR_RETURN(shape.scaling, scaling(shape));
    shapes.push_back(std::move(shape));
  }
  ASSIGN_OR_RETURN(Adapter adapter, Adapter::Create(shapes, std::move(reuse)));
  adapter.source = origin;
  for (size_t i = 0; i < order.size(); ++i) {
    const Parts& p = parts[order[i]];
    view.ReadF32(*p.t[0], {adapter.A(i).data(), static_cast<size_t>(adapter.A(i).size())});
    view.ReadF32(*p.t[1], {adapter.B(i).data(), static_cast<size_t>(adapter.B(i).size())});
    if (p.t[2] != nullptr)
      view.ReadF32(*p.t[2], {adapter.R(i).data(), static_cast<size_t>(adapter.R(i).size())});
  }
  return adapter;
}

std::vector<TensorToWrite> AdapterTensors(const Adapter& adapter, AdapterParts parts) {
  std::vector<TensorToWrite> tensors;
  const auto span_of = [](const ConstMapF& x) {
    return std::span<const float>(x.data(), static_cast<size_t>(x.size()));
  };
  for (size_t i = 0; i < adapter.num_modules(); ++i) {
    const LoraModule& m = adapter.module(i);
    const std::string base = StrCat(kPrefix, m.name);
    if (parts == AdapterParts::kAll) {
      tensors.push_back({base + ".lora_A.weight", {m.rank, m.in_features}, span_of(adapter.A(i))});
      tensors.push_back({base + ".lora_B.weight", {m.out_features, m.rank}, span_of(adapter.B(i))});
    }
    if (m.has_r)
      tensors.push_back({base + ".lora_R.weight", {m.rank, m.rank}, span_of(adapter.R(i))});
  }
  return tensors;
}

absl::Status WritePeftAdapter(const Adapter& adapter, const fs::path& dir,
                              const PeftWriteOptions& options) {
  if (adapter.num_modules() == 0)
    return absl::InvalidArgumentError("cannot write an adapter with no modules");
  std::vector<int> ranks;
  std::vector<double> alphas;
  std::set<std::string> targets;
  for (const LoraModule& m : adapter.modules()) {
    ranks.push_back(m.rank);
    alphas.push_back(m.scaling * m.rank);
    targets.insert(m.name.substr(m.name.rfind('.') + 1));
  }
  const int r = MostCommon(ranks);
  const double alpha = MostCommon(alphas);
  Json rank_pattern = Json::object(), alpha_pattern = Json::object();
  for (size_t i = 0; i < ranks.size(); ++i) {
    const std::string key = RegexEscape(adapter.module(i).name);
    if (ranks[i] != r) rank_pattern[key] = ranks[i];
    if (alphas[i] != alpha) alpha_pattern[key] = alphas[i];
  }
  Json config = {
      {"peft_type", "LORA"},
      {"base_model_name_or_path",
       adapter.base_model.empty() ? Json(nullptr) : Json(adapter.base_model)},
      {"r", r},
      {"lora_alpha", alpha},
      {"use_rslora", false},
      {"target_modules", std::vector<std::string>(targets.begin(), targets.end())},
      {"rank_pattern", rank_pattern},
      {"alpha_pattern", alpha_pattern},
      {"lora_dropout", 0.0},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"inference_mode", true},
      {"modules_to_save", nullptr},
  };

  const std::vector<TensorToWrite> tensors = AdapterTensors(adapter, AdapterParts::kAll);
  Env* env = options.env;
  return BuildDirectoryAtomically(
      dir, options.overwrite,
      [&](const fs::path& tmp) -> absl::Status {
        RETURN_IF_ERROR(WriteFileSynced(tmp / kAdapterConfigFile, config.dump(2) + "\n", env));
        return WriteFileSynced(
            tmp / kAdapterWeightsFile,
            [&](std::FILE* out) {
              return WriteSafetensors(out, tensors, options.dtype, {{"format", "pt"}});
            },
            env);
      },
      env);
}

}  // namespace fedlora::common
