#include "common/llm/llama_config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <tuple>
#include <utility>

#include "absl/status/status.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

absl::Status Refuse(const std::string& origin, const std::string& what) {
  return absl::InvalidArgumentError(
      StrCat(origin, ": ", what,
             "; fedlora's trainer implements the llama, mistral, qwen2 and qwen3 decoders"));
}

// Why a known architecture is not implemented, or "" for one fedlora does not know.
std::string WhyNot(const std::string& model_type) {
  if (model_type.starts_with("gemma"))
    return "Gemma scales the embeddings by √hidden_size, keeps RMSNorm weights as 1 + w, uses a "
           "GELU MLP and (Gemma 2/3) soft-capped logits and extra norms, none of which the "
           "trainer computes";
  if (model_type == "phi3" || model_type == "phi4")
    return "Phi-3 fuses q, k and v into one qkv_proj and gate and up into gate_up_proj, which "
           "PEFT's per-projection adapters do not address";
  if (model_type.find("moe") != std::string::npos || model_type == "mixtral" ||
      model_type.starts_with("deepseek") || model_type == "dbrx" || model_type == "jamba")
    return "a mixture-of-experts MLP (a router and many expert MLPs per layer) is not implemented";
  return "";
}

// The largest sizes fedlora takes from config.json. Each is generous for the largest open
// checkpoints — Llama 3.1 405B (hidden 16384, intermediate 53248, 126 layers, 128 query heads),
// Nemotron-4 340B (intermediate 73728), Gemma 3 (vocabulary 262144, head_dim 256), Llama 4 Scout
// (a context of 10M) — and small enough that a config alone cannot make fedlora allocate the
// impossible: per-layer tables stay small, and at every cap at once the parameter count (~2^54)
// and its bytes fit in int64 (ModelSizeOf).
constexpr int64_t kMaxWidth = 1 << 16;         // hidden_size, head_dim: 4× 405B's 16384
constexpr int64_t kMaxIntermediate = 1 << 20;  // 14× Nemotron-4's 73728
constexpr int64_t kMaxLayers = 1 << 10;        // 8× 405B's 126
constexpr int64_t kMaxHeads = 1 << 10;         // query and key/value heads: 8× 405B's 128
constexpr int64_t kMaxVocabulary = 1 << 22;    // 16× Gemma 3's 262144
// Positions (max_position_embeddings, sliding_window, llama3's original context): 100× Llama 4
// Scout's context, and a position plus a count of new tokens still fits in an int.
constexpr int64_t kMaxPositions = 1 << 30;

absl::Status OverCap(const std::string& origin, const std::string& key, const nlohmann::json& v,
                     int64_t cap) {
  return absl::InvalidArgumentError(StrCat(origin, ": ", key, " is ", v.dump(),
                                           "; fedlora takes at most ", cap,
                                           ", more than any published checkpoint has (hint: a "
                                           "damaged config.json, or another kind of model?)"));
}

// A positive integer field of at most `cap`; `fallback` < 0 means required.
absl::StatusOr<int> BoundedInt(const nlohmann::json& json, const std::string& origin,
                               const char* key, int64_t cap, int fallback = -1) {
  if (!json.contains(key) || json[key].is_null()) {
    if (fallback >= 0) return fallback;
    return absl::InvalidArgumentError(StrCat(origin, ": missing \"", key, "\""));
  }
  const nlohmann::json& v = json[key];
  // JSON's non-negative integers are unsigned, negative ones signed.
  if (!v.is_number_integer() || (!v.is_number_unsigned() && v.get<int64_t>() <= 0) || v == 0)
    return absl::InvalidArgumentError(
        StrCat(origin, ": \"", key, "\" must be a positive integer, got ", v.dump()));
  if (v.get<uint64_t>() > static_cast<uint64_t>(cap)) return OverCap(origin, key, v, cap);
  return v.get<int>();
}

absl::StatusOr<double> PositiveNumber(const nlohmann::json& json, const std::string& origin,
                                      const char* key, double fallback) {
  if (!json.contains(key) || json[key].is_null()) return fallback;
  const nlohmann::json& v = json[key];
  if (!v.is_number() || !(v.get<double>() > 0))
    return absl::InvalidArgumentError(
        StrCat(origin, ": \"", key, "\" must be a positive number, got ", v.dump()));
  return v.get<double>();
}

// A true/false field (absent or null: false).
absl::StatusOr<bool> Flag(const nlohmann::json& json, const std::string& origin, const char* key) {
  if (!json.contains(key) || json[key].is_null()) return false;
  if (!json[key].is_boolean())
    return absl::InvalidArgumentError(
        StrCat(origin, ": \"", key, "\" must be true or false, got ", json[key].dump()));
  return json[key].get<bool>();
}

// config.json's rope_scaling (transformers ≤ 4.x) or rope_parameters (5.x, which also carries
// rope_theta) into `c`.
absl::Status ParseRope(const nlohmann::json& json, const std::string& origin, LlamaConfig& c) {
  nlohmann::json rope = json.value("rope_scaling", nlohmann::json());
  if (json.contains("rope_parameters") && json["rope_parameters"].is_object()) {
    rope = json["rope_parameters"];
    if (rope.contains("rope_theta")) {
      if (!rope["rope_theta"].is_number() || !(rope["rope_theta"].get<double>() > 0))
        return absl::InvalidArgumentError(StrCat(origin, ": rope_parameters.rope_theta must be a ",
                                                 "positive number, got ",
                                                 rope["rope_theta"].dump()));
      c.rope_theta = rope["rope_theta"].get<double>();
    }
  }
  if (rope.is_null()) return absl::OkStatus();
  if (!rope.is_object())
    return absl::InvalidArgumentError(
        StrCat(origin, ": rope_scaling must be an object or null, got ", rope.dump()));
  const nlohmann::json type_json =
      rope.contains("rope_type") ? rope["rope_type"] : rope.value("type", nlohmann::json());
  const std::string type = type_json.is_string() ? type_json.get<std::string>() : "default";
  auto number = [&](const char* key, double* out, bool required) -> absl::Status {
    if (!rope.contains(key) || rope[key].is_null()) {
      if (!required) return absl::OkStatus();
      return absl::InvalidArgumentError(
          StrCat(origin, ": rope_scaling of type ", type, " needs \"", key, "\""));
    }
    if (!rope[key].is_number() || !(rope[key].get<double>() > 0))
      return absl::InvalidArgumentError(StrCat(
          origin, ": rope_scaling.", key, " must be a positive number, got ", rope[key].dump()));
    *out = rope[key].get<double>();
    return absl::OkStatus();
  };
  if (type == "default") return absl::OkStatus();
  RopeScaling& r = c.rope_scaling;
  if (type == "linear" || type == "dynamic") {
    r.type = type == "linear" ? RopeScaling::Type::kLinear : RopeScaling::Type::kDynamic;
    return number("factor", &r.factor, true);
  }
  if (type == "llama3") {
    r.type = RopeScaling::Type::kLlama3;
    double original = 0;
    for (auto [key, out] :
         {std::pair{"factor", &r.factor}, std::pair{"low_freq_factor", &r.low_freq_factor},
          std::pair{"high_freq_factor", &r.high_freq_factor},
          std::pair{"original_max_position_embeddings", &original}})
      if (absl::Status st = number(key, out, true); !st.ok()) return st;
    if (original > kMaxPositions)
      return OverCap(origin, "rope_scaling.original_max_position_embeddings",
                     rope["original_max_position_embeddings"], kMaxPositions);
    if (r.high_freq_factor <= r.low_freq_factor || original != std::floor(original))
      return absl::InvalidArgumentError(
          StrCat(origin, ": rope_scaling ", rope.dump(),
                 " needs high_freq_factor > low_freq_factor and an integer "
                 "original_max_position_embeddings"));
    r.original_max_position_embeddings = static_cast<int>(original);
    return absl::OkStatus();
  }
  return Refuse(origin, StrCat("rope_scaling type \"", type,
                               "\" is not implemented (implemented: linear, dynamic, llama3)"));
}

// Sliding windows: Mistral's on every layer; Qwen's, when enabled, on the layers that
// layer_types names, or else on those from max_window_layers on.
// An absent sliding_window is the config classes' default, 4096; null means none.
absl::Status ParseSlidingWindows(const nlohmann::json& json, const std::string& origin,
                                 bool use_sliding_window, LlamaConfig& c) {
  const nlohmann::json window_json = json.value("sliding_window", nlohmann::json(4096));
  const bool windowed =
      c.model_type == "mistral" || (c.model_type != "llama" && use_sliding_window);
  if (!windowed || window_json.is_null()) return absl::OkStatus();
  ASSIGN_OR_RETURN(const int window,
                   BoundedInt(json, origin, "sliding_window", kMaxPositions, 4096));
  c.layer_window.assign(static_cast<size_t>(c.num_hidden_layers), window);
  if (c.model_type != "mistral") {
    const nlohmann::json types = json.value("layer_types", nlohmann::json());
    if (types.is_array()) {
      if (types.size() != static_cast<size_t>(c.num_hidden_layers))
        return absl::InvalidArgumentError(StrCat(origin, ": layer_types has ", types.size(),
                                                 " entries for ", c.num_hidden_layers, " layers"));
      for (size_t l = 0; l < types.size(); ++l) {
        if (types[l] != "sliding_attention" && types[l] != "full_attention")
          return Refuse(origin, StrCat("layer_types[", l, "] is ", types[l].dump()));
        if (types[l] == "full_attention") c.layer_window[l] = 0;
      }
    } else {
      const nlohmann::json full_json = json.value("max_window_layers", nlohmann::json(28));
      if (!full_json.is_number_integer() || full_json.get<int64_t>() < 0)
        return absl::InvalidArgumentError(
            StrCat(origin, ": \"max_window_layers\" must be a non-negative integer, got ",
                   full_json.dump()));
      const int64_t full = full_json.get<int64_t>();  // Qwen2Config's default: 28
      for (int l = 0; l < std::min<int64_t>(full, c.num_hidden_layers); ++l) c.layer_window[l] = 0;
    }
  }
  if (std::all_of(c.layer_window.begin(), c.layer_window.end(), [](int w) { return w == 0; }))
    c.layer_window.clear();
  return absl::OkStatus();
}

// bos_token_id and eos_token_id (one id or a list), each an id of the vocabulary.
absl::Status ParseSpecialTokens(const nlohmann::json& json, const std::string& origin,
                                LlamaConfig& c) {
  auto token_id = [&](const nlohmann::json& v) -> absl::StatusOr<int> {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= c.vocab_size)
      return absl::InvalidArgumentError(
          StrCat(origin, ": token id ", v.dump(), " is not in [0, vocab_size=", c.vocab_size, ")"));
    return v.get<int>();
  };
  if (json.contains("bos_token_id") && !json["bos_token_id"].is_null()) {
    ASSIGN_OR_RETURN(c.bos_token_id, token_id(json["bos_token_id"]));
  }
  if (json.contains("eos_token_id") && !json["eos_token_id"].is_null()) {
    const nlohmann::json& eos = json["eos_token_id"];
    for (const nlohmann::json& v : eos.is_array() ? eos : nlohmann::json::array({eos})) {
      ASSIGN_OR_RETURN(const int id, token_id(v));
      c.eos_token_ids.push_back(id);
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaConfig> ParseLlamaConfig(const nlohmann::json& json,
                                             const std::string& origin) {
  if (!json.is_object()) return absl::InvalidArgumentError(StrCat(origin, ": not a JSON object"));
  const std::string model_type = json.value("model_type", std::string());
  if (model_type != "llama" && model_type != "mistral" && model_type != "qwen2" &&
      model_type != "qwen3") {
    const std::string why = WhyNot(model_type);
    return Refuse(origin,
                  StrCat("model_type is \"", model_type, "\"", why.empty() ? "" : ": ", why));
  }
  const std::string act = json.value("hidden_act", std::string("silu"));
  if (act != "silu") return Refuse(origin, StrCat("hidden_act is \"", act, "\", not \"silu\""));
  if (json.contains("partial_rotary_factor") && json["partial_rotary_factor"] != 1 &&
      !json["partial_rotary_factor"].is_null())
    return Refuse(origin, StrCat("partial_rotary_factor is ", json["partial_rotary_factor"].dump(),
                                 " (rotary embeddings on part of each head)"));

  LlamaConfig c;
  c.model_type = model_type;
  auto get = [&](const char* key, int* out, int64_t cap, int fallback = -1) -> absl::Status {
    ASSIGN_OR_RETURN(*out, BoundedInt(json, origin, key, cap, fallback));
    return absl::OkStatus();
  };
  for (auto [key, out, cap] :
       {std::tuple{"hidden_size", &c.hidden_size, kMaxWidth},
        std::tuple{"intermediate_size", &c.intermediate_size, kMaxIntermediate},
        std::tuple{"num_hidden_layers", &c.num_hidden_layers, kMaxLayers},
        std::tuple{"num_attention_heads", &c.num_attention_heads, kMaxHeads},
        std::tuple{"vocab_size", &c.vocab_size, kMaxVocabulary}}) {
    RETURN_IF_ERROR(get(key, out, cap));
  }
  RETURN_IF_ERROR(
      get("num_key_value_heads", &c.num_key_value_heads, kMaxHeads, c.num_attention_heads));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    return absl::InvalidArgumentError(
        StrCat(origin, ": num_attention_heads (", c.num_attention_heads,
               ") must be a multiple of num_key_value_heads (", c.num_key_value_heads, ")"));
  if (c.hidden_size % c.num_attention_heads != 0 && !json.contains("head_dim"))
    return absl::InvalidArgumentError(StrCat(origin, ": hidden_size (", c.hidden_size,
                                             ") is not a multiple of ", "num_attention_heads (",
                                             c.num_attention_heads, ") and no head_dim is given"));
  // Qwen3Config's default head_dim is 128; the others derive it.
  const int head_dim = model_type == "qwen3" ? 128 : c.hidden_size / c.num_attention_heads;
  RETURN_IF_ERROR(get("head_dim", &c.head_dim, kMaxWidth, head_dim));
  if (c.head_dim % 2 != 0)
    return absl::InvalidArgumentError(
        StrCat(origin, ": head_dim must be even for rotary embeddings, got ", c.head_dim));
  RETURN_IF_ERROR(get("max_position_embeddings", &c.max_position_embeddings, kMaxPositions, 2048));
  absl::StatusOr<double> eps = PositiveNumber(json, origin, "rms_norm_eps", 1e-6);
  if (!eps.ok()) return eps.status();
  c.rms_norm_eps = *eps;
  absl::StatusOr<double> theta = PositiveNumber(json, origin, "rope_theta", 10000.0);
  if (!theta.ok()) return theta.status();
  c.rope_theta = *theta;
  if (absl::Status st = ParseRope(json, origin, c); !st.ok()) return st;
  bool flags[4];  // tie_word_embeddings, attention_bias, mlp_bias, use_sliding_window
  for (int i = 0; const char* key :
                  {"tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window"}) {
    absl::StatusOr<bool> flag = Flag(json, origin, key);
    if (!flag.ok()) return flag.status();
    flags[i++] = *flag;
  }
  c.tie_word_embeddings = flags[0];

  // Biases, as each family's attention and MLP modules create them.
  const bool attention_bias = flags[1];
  for (LinearKind k : {LinearKind::kQ, LinearKind::kK, LinearKind::kV, LinearKind::kO})
    c.bias[static_cast<int>(k)] =
        model_type == "qwen2" ? k != LinearKind::kO : model_type != "mistral" && attention_bias;
  if (model_type == "llama" && flags[2])
    for (LinearKind k : {LinearKind::kGate, LinearKind::kUp, LinearKind::kDown})
      c.bias[static_cast<int>(k)] = true;
  c.qk_norm = model_type == "qwen3";

  RETURN_IF_ERROR(ParseSlidingWindows(json, origin, flags[3], c));
  RETURN_IF_ERROR(ParseSpecialTokens(json, origin, c));
  return c;
}

absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / kModelConfigFile;
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(
        StrCat("cannot read ", path.string(), " (expected a Hugging Face model directory)"));
  nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded())
    return absl::InvalidArgumentError(StrCat(path.string(), ": not valid JSON"));
  return ParseLlamaConfig(json, path.string());
}

const char* ArchitectureName(const std::string& model_type) {
  return model_type == "mistral" ? "MistralForCausalLM"
         : model_type == "qwen2" ? "Qwen2ForCausalLM"
         : model_type == "qwen3" ? "Qwen3ForCausalLM"
                                 : "LlamaForCausalLM";
}

nlohmann::json LlamaConfigJson(const LlamaConfig& c) {
  const std::string& type = c.model_type;
  nlohmann::json json = {
      {"architectures", {ArchitectureName(type)}},
      {"model_type", type},
      {"hidden_act", "silu"},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_hidden_layers},
      {"num_attention_heads", c.num_attention_heads},
      {"num_key_value_heads", c.num_key_value_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", nullptr},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"torch_dtype", "float32"},
  };
  const RopeScaling& r = c.rope_scaling;
  switch (r.type) {
    case RopeScaling::Type::kNone:
      break;
    case RopeScaling::Type::kLinear:
    case RopeScaling::Type::kDynamic:
      json["rope_scaling"] = {
          {"rope_type", r.type == RopeScaling::Type::kLinear ? "linear" : "dynamic"},
          {"factor", r.factor}};
      break;
    case RopeScaling::Type::kLlama3:
      json["rope_scaling"] = {
          {"rope_type", "llama3"},
          {"factor", r.factor},
          {"low_freq_factor", r.low_freq_factor},
          {"high_freq_factor", r.high_freq_factor},
          {"original_max_position_embeddings", r.original_max_position_embeddings}};
      break;
  }
  if (type == "llama" || type == "qwen3") json["attention_bias"] = c.has_bias(LinearKind::kQ);
  if (type == "llama") json["mlp_bias"] = c.has_bias(LinearKind::kGate);
  // Windows: Mistral's on every layer; Qwen's on the layers layer_types names (transformers
  // before 4.53 reads max_window_layers instead, which says the same when they are the last ones).
  int window = 0, first_windowed = c.num_hidden_layers;
  for (int l = 0; l < c.num_hidden_layers; ++l) window = std::max(window, c.window(l));
  while (first_windowed > 0 && c.window(first_windowed - 1) > 0) --first_windowed;
  if (type == "mistral") json["sliding_window"] = window > 0 ? nlohmann::json(window) : nullptr;
  if (type == "qwen2" || type == "qwen3") {
    json["use_sliding_window"] = window > 0;
    json["sliding_window"] = window > 0 ? nlohmann::json(window) : nullptr;
    json["max_window_layers"] = first_windowed;
    nlohmann::json types = nlohmann::json::array();
    for (int l = 0; l < c.num_hidden_layers; ++l)
      types.push_back(c.window(l) > 0 ? "sliding_attention" : "full_attention");
    json["layer_types"] = types;
  }
  if (c.bos_token_id >= 0) json["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) json["eos_token_id"] = c.eos_token_ids[0];
  if (c.eos_token_ids.size() > 1) json["eos_token_id"] = c.eos_token_ids;
  return json;
}

std::vector<double> RopeInverseFrequencies(const LlamaConfig& c, int seq_len) {
  const int D = c.head_dim;
  const RopeScaling& r = c.rope_scaling;
  double base = c.rope_theta;
  if (r.type == RopeScaling::Type::kDynamic && seq_len > c.max_position_embeddings)
    base *= std::pow(r.factor * seq_len / c.max_position_embeddings - (r.factor - 1),
                     static_cast<double>(D) / (D - 2));
  std::vector<double> inv_freq(static_cast<size_t>(D / 2));
  for (int i = 0; i < D / 2; ++i) {
    double f = std::pow(base, -2.0 * i / D);
    if (r.type == RopeScaling::Type::kLinear) f /= r.factor;
    if (r.type == RopeScaling::Type::kLlama3) {
      // Wavelengths longer than the original context / low_freq_factor are slowed by `factor`;
      // shorter than original / high_freq_factor kept; in between, interpolated smoothly.
      const double original = r.original_max_position_embeddings;
      const double wavelen = 2 * M_PI / f;
      if (wavelen > original / r.low_freq_factor) {
        f /= r.factor;
      } else if (wavelen >= original / r.high_freq_factor) {
        const double smooth =
            (original / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
        f = (1 - smooth) * f / r.factor + smooth * f;
      }
    }
    inv_freq[static_cast<size_t>(i)] = f;
  }
  return inv_freq;
}

void RopeTables(const LlamaConfig& config, int seq_len, int positions, std::vector<float>& cos,
                std::vector<float>& sin) {
  const std::vector<double> inv_freq = RopeInverseFrequencies(config, seq_len);
  const size_t half = static_cast<size_t>(config.head_dim / 2);
  cos.resize(static_cast<size_t>(positions) * half);
  sin.resize(cos.size());
  for (size_t t = 0; t < static_cast<size_t>(positions); ++t)
    for (size_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(t) * inv_freq[i];
      cos[t * half + i] = static_cast<float>(std::cos(angle));
      sin[t * half + i] = static_cast<float>(std::sin(angle));
    }
}

const char* LinearName(LinearKind kind) {
  static constexpr const char* kNames[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                           "gate_proj", "up_proj", "down_proj"};
  return kNames[static_cast<int>(kind)];
}

std::string LinearPath(int layer, LinearKind kind) {
  const bool attention = kind <= LinearKind::kO;
  return StrCat("model.layers.", layer, attention ? ".self_attn." : ".mlp.", LinearName(kind));
}

absl::StatusOr<std::vector<LinearKind>> ParseLinearKinds(const std::vector<std::string>& names) {
  std::vector<LinearKind> kinds;
  for (const std::string& name : names) {
    int k = 0;
    while (k < kNumLinearKinds && name != LinearName(static_cast<LinearKind>(k))) ++k;
    if (k == kNumLinearKinds) {
      return absl::InvalidArgumentError(
          StrCat("unknown target module \"", name,
                 "\"; expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj"));
    }
    kinds.push_back(static_cast<LinearKind>(k));
  }
  return kinds;
}

namespace {

// [out, in] of the linear's weight in int64: q_dim() and kv_dim() overflow int for a config that
// was not parsed.
std::pair<int64_t, int64_t> LinearShape(const LlamaConfig& c, LinearKind kind) {
  const int64_t q = int64_t{c.num_attention_heads} * c.head_dim;
  const int64_t kv = int64_t{c.num_key_value_heads} * c.head_dim;
  switch (kind) {
    case LinearKind::kQ:
      return {q, c.hidden_size};
    case LinearKind::kK:
    case LinearKind::kV:
      return {kv, c.hidden_size};
    case LinearKind::kO:
      return {c.hidden_size, q};
    case LinearKind::kGate:
    case LinearKind::kUp:
      return {c.intermediate_size, c.hidden_size};
    case LinearKind::kDown:
      return {c.hidden_size, c.intermediate_size};
  }
  return {0, 0};
}

}  // namespace

int LinearOut(const LlamaConfig& c, LinearKind kind) {
  return static_cast<int>(LinearShape(c, kind).first);
}

int LinearIn(const LlamaConfig& c, LinearKind kind) {
  return static_cast<int>(LinearShape(c, kind).second);
}

absl::StatusOr<ModelSize> ModelSizeOf(const LlamaConfig& c) {
  const std::string sizes =
      StrCat("num_hidden_layers ", c.num_hidden_layers, ", hidden_size ", c.hidden_size,
             ", intermediate_size ", c.intermediate_size, ", num_attention_heads ",
             c.num_attention_heads, ", num_key_value_heads ", c.num_key_value_heads, ", head_dim ",
             c.head_dim, ", vocab_size ", c.vocab_size);
  for (int n : {c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                c.num_key_value_heads, c.head_dim, c.vocab_size})
    if (n < 0)
      return absl::InvalidArgumentError(
          StrCat("a model of ", sizes, ": expected sizes of 0 or more"));
  ModelSize size;
  std::string overflow;  // the first term that does not fit
  // Adds count·rows·cols parameters, each step checked.
  auto add = [&](const std::string& what, int64_t count, int64_t rows, int64_t cols) {
    int64_t n = 0;
    if (overflow.empty() &&
        (__builtin_mul_overflow(count, rows, &n) || __builtin_mul_overflow(n, cols, &n) ||
         __builtin_add_overflow(size.parameters, n, &size.parameters)))
      overflow = StrCat(what, " (", count, " × [", rows, ", ", cols, "])");
  };
  const int64_t L = c.num_hidden_layers, H = c.hidden_size, V = c.vocab_size;
  add("embed_tokens", 1, V, H);
  if (!c.tie_word_embeddings) add("lm_head", 1, V, H);
  add("the RMSNorms", 2 * L + 1, H, 1);
  if (c.qk_norm) add("q_norm and k_norm", 2 * L, c.head_dim, 1);
  for (int k = 0; k < kNumLinearKinds; ++k) {
    const LinearKind kind = static_cast<LinearKind>(k);
    const auto [out, in] = LinearShape(c, kind);
    add(LinearName(kind), L, out, in);
    if (c.has_bias(kind)) add(StrCat(LinearName(kind), " bias"), L, out, 1);
  }
  if (overflow.empty() &&
      __builtin_mul_overflow(size.parameters, int64_t{sizeof(float)}, &size.f32_bytes))
    overflow = StrCat("its bytes as f32 (4 × ", size.parameters, ")");
  if (!overflow.empty())
    return absl::InvalidArgumentError(
        StrCat("a model of ", sizes, " has more parameters than int64 counts: ", overflow,
               " overflows; expected a model whose size fits in 2^63 - 1"));
  return size;
}

absl::StatusOr<std::vector<size_t>> AdapterSlots(const LlamaConfig& c, const Adapter& adapter) {
  std::vector<size_t> slots;
  for (const LoraModule& m : adapter.modules()) {
    bool found = false;
    for (int l = 0; l < c.num_hidden_layers && !found; ++l)
      for (int k = 0; k < kNumLinearKinds && !found; ++k) {
        const LinearKind kind = static_cast<LinearKind>(k);
        if (m.name != LinearPath(l, kind)) continue;
        if (m.out_features != LinearOut(c, kind) || m.in_features != LinearIn(c, kind))
          return absl::InvalidArgumentError(
              StrCat("adapter module ", m.name, " is [", m.out_features, ", ", m.in_features,
                     "] but the model's linear is [", LinearOut(c, kind), ", ", LinearIn(c, kind),
                     "] (hint: adapter trained on another base model?)"));
        slots.push_back(LinearSlot(l, kind));
        found = true;
      }
    if (!found)
      return absl::InvalidArgumentError(StrCat(
          "adapter module ", m.name, " is not a linear layer of this model (", c.num_hidden_layers,
          " layers; expected model.layers.<l>.self_attn.{q,k,v,o}_proj ",
          "or model.layers.<l>.mlp.{gate,up,down}_proj; hint: adapter trained on another ",
          "base model?)"));
  }
  return slots;
}

namespace {

struct Preset {
  const char* name;
  LlamaConfig (*make)();
};

// The tiny Llama: 2 layers of width 64, 4 query and 2 key/value heads of 16.
LlamaConfig Tiny() {
  LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 192;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 16;
  c.max_position_embeddings = 1024;
  c.rope_theta = 10000;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = true;
  return c;
}

// A real checkpoint's sizes on top of `c`.
LlamaConfig Sized(LlamaConfig c, int hidden, int intermediate, int layers, int heads, int kv_heads,
                  int head_dim, int vocab, int context) {
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_hidden_layers = layers;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = vocab;
  c.max_position_embeddings = context;
  return c;
}

// Each family's variation, as its checkpoints configure it.
LlamaConfig Llama3(LlamaConfig c, int original_context, double factor = 32) {
  c.rope_theta = 500000;
  c.rope_scaling = {RopeScaling::Type::kLlama3, factor, 1, 4, original_context};
  return c;
}
LlamaConfig Qwen(LlamaConfig c, const char* model_type) {
  c.model_type = model_type;
  c.rope_theta = 1000000;
  c.rms_norm_eps = 1e-6;
  if (c.model_type == "qwen2")
    for (LinearKind k : {LinearKind::kQ, LinearKind::kK, LinearKind::kV})
      c.bias[static_cast<int>(k)] = true;
  c.qk_norm = c.model_type == "qwen3";
  return c;
}

constexpr Preset kPresets[] = {
    {"tiny", Tiny},
    // Llama 3.2's scaling with an original context of 64, so that it changes short sequences.
    {"tiny-llama3", [] { return Llama3(Tiny(), 64); }},
    {"tiny-mistral",
     [] {
       LlamaConfig c = Tiny();
       c.model_type = "mistral";
       c.tie_word_embeddings = false;
       c.layer_window.assign(2, 32);
       return c;
     }},
    {"tiny-qwen2", [] { return Qwen(Tiny(), "qwen2"); }},
    {"tiny-qwen3",
     [] {
       LlamaConfig c = Qwen(Tiny(), "qwen3");
       c.head_dim = 32;  // explicit, ≠ 64 / 4, as Qwen3's checkpoints have it
       return c;
     }},
    {"smollm2-135m",
     [] {
       LlamaConfig c = Sized(Tiny(), 576, 1536, 30, 9, 3, 64, 49152, 8192);
       c.rope_theta = 100000;
       return c;
     }},
    {"llama-3.2-1b",
     [] { return Llama3(Sized(Tiny(), 2048, 8192, 16, 32, 8, 64, 128256, 131072), 8192); }},
    {"llama-3.2-3b",
     [] { return Llama3(Sized(Tiny(), 3072, 8192, 28, 24, 8, 128, 128256, 131072), 8192); }},
    {"llama-3.1-8b",
     [] {
       LlamaConfig c = Llama3(Sized(Tiny(), 4096, 14336, 32, 32, 8, 128, 128256, 131072), 8192, 8);
       c.tie_word_embeddings = false;
       return c;
     }},
    {"qwen2.5-0.5b",
     [] { return Qwen(Sized(Tiny(), 896, 4864, 24, 14, 2, 64, 151936, 32768), "qwen2"); }},
    {"qwen3-0.6b",
     [] { return Qwen(Sized(Tiny(), 1024, 3072, 28, 16, 8, 128, 151936, 40960), "qwen3"); }},
};

}  // namespace

std::string LlamaPresetNames() {
  std::string names;
  for (const Preset& p : kPresets) names += StrCat(names.empty() ? "" : ", ", p.name);
  return names;
}

absl::StatusOr<LlamaConfig> LlamaPreset(const std::string& name) {
  for (const Preset& p : kPresets)
    if (name == p.name) return p.make();
  return absl::InvalidArgumentError(
      StrCat("unknown preset \"", name, "\"; expected one of ", LlamaPresetNames()));
}

}  // namespace fedlora::common
