#include "common/llm/llama_config.h"

#include <fstream>

#include "absl/status/status.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

absl::Status Refuse(const std::string& origin, const std::string& what) {
  return absl::InvalidArgumentError(
      StrCat(origin, ": ", what,
             "; fedlora's trainer implements the plain Llama decoder (model_type \"llama\")"));
}

// A positive integer field; `fallback` < 0 means required.
absl::StatusOr<int> PositiveInt(const nlohmann::json& json, const std::string& origin,
                                const char* key, int fallback = -1) {
  if (!json.contains(key) || json[key].is_null()) {
    if (fallback >= 0) return fallback;
    return absl::InvalidArgumentError(StrCat(origin, ": missing \"", key, "\""));
  }
  const nlohmann::json& v = json[key];
  if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > (1 << 30))
    return absl::InvalidArgumentError(
        StrCat(origin, ": \"", key, "\" must be a positive integer, got ", v.dump()));
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

}  // namespace

absl::StatusOr<LlamaConfig> ParseLlamaConfig(const nlohmann::json& json,
                                             const std::string& origin) {
  if (!json.is_object()) return absl::InvalidArgumentError(StrCat(origin, ": not a JSON object"));
  const std::string model_type = json.value("model_type", std::string());
  if (model_type != "llama") return Refuse(origin, StrCat("model_type is \"", model_type, "\""));
  if (json.contains("rope_scaling") && !json["rope_scaling"].is_null())
    return Refuse(origin, StrCat("rope_scaling ", json["rope_scaling"].dump(),
                                 " is not implemented (use a checkpoint without rope_scaling)"));
  for (const char* bias : {"attention_bias", "mlp_bias"})
    if (json.value(bias, false)) return Refuse(origin, StrCat("\"", bias, "\" is true (biases)"));
  const std::string act = json.value("hidden_act", std::string("silu"));
  if (act != "silu") return Refuse(origin, StrCat("hidden_act is \"", act, "\", not \"silu\""));

  LlamaConfig c;
  auto get = [&](const char* key, int* out, int fallback = -1) -> absl::Status {
    absl::StatusOr<int> v = PositiveInt(json, origin, key, fallback);
    if (!v.ok()) return v.status();
    *out = *v;
    return absl::OkStatus();
  };
  for (auto [key, out] : {std::pair{"hidden_size", &c.hidden_size},
                          std::pair{"intermediate_size", &c.intermediate_size},
                          std::pair{"num_hidden_layers", &c.num_hidden_layers},
                          std::pair{"num_attention_heads", &c.num_attention_heads},
                          std::pair{"vocab_size", &c.vocab_size}}) {
    if (absl::Status st = get(key, out); !st.ok()) return st;
  }
  if (absl::Status st = get("num_key_value_heads", &c.num_key_value_heads, c.num_attention_heads);
      !st.ok())
    return st;
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    return absl::InvalidArgumentError(
        StrCat(origin, ": num_attention_heads (", c.num_attention_heads,
               ") must be a multiple of num_key_value_heads (", c.num_key_value_heads, ")"));
  if (c.hidden_size % c.num_attention_heads != 0 && !json.contains("head_dim"))
    return absl::InvalidArgumentError(StrCat(origin, ": hidden_size (", c.hidden_size,
                                             ") is not a multiple of ", "num_attention_heads (",
                                             c.num_attention_heads, ") and no head_dim is given"));
  if (absl::Status st = get("head_dim", &c.head_dim, c.hidden_size / c.num_attention_heads);
      !st.ok())
    return st;
  if (c.head_dim % 2 != 0)
    return absl::InvalidArgumentError(
        StrCat(origin, ": head_dim must be even for rotary embeddings, got ", c.head_dim));
  if (absl::Status st = get("max_position_embeddings", &c.max_position_embeddings, 2048); !st.ok())
    return st;
  absl::StatusOr<double> eps = PositiveNumber(json, origin, "rms_norm_eps", 1e-6);
  if (!eps.ok()) return eps.status();
  c.rms_norm_eps = *eps;
  absl::StatusOr<double> theta = PositiveNumber(json, origin, "rope_theta", 10000.0);
  if (!theta.ok()) return theta.status();
  c.rope_theta = *theta;
  c.tie_word_embeddings = json.value("tie_word_embeddings", false);

  auto token_id = [&](const nlohmann::json& v) -> absl::StatusOr<int> {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= c.vocab_size)
      return absl::InvalidArgumentError(
          StrCat(origin, ": token id ", v.dump(), " is not in [0, vocab_size=", c.vocab_size, ")"));
    return v.get<int>();
  };
  if (json.contains("bos_token_id") && !json["bos_token_id"].is_null()) {
    absl::StatusOr<int> id = token_id(json["bos_token_id"]);
    if (!id.ok()) return id.status();
    c.bos_token_id = *id;
  }
  if (json.contains("eos_token_id") && !json["eos_token_id"].is_null()) {
    const nlohmann::json& eos = json["eos_token_id"];
    for (const nlohmann::json& v : eos.is_array() ? eos : nlohmann::json::array({eos})) {
      absl::StatusOr<int> id = token_id(v);
      if (!id.ok()) return id.status();
      c.eos_token_ids.push_back(*id);
    }
  }
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

nlohmann::json LlamaConfigJson(const LlamaConfig& c) {
  nlohmann::json json = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
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
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"torch_dtype", "float32"},
  };
  if (c.bos_token_id >= 0) json["bos_token_id"] = c.bos_token_id;
  if (c.eos_token_ids.size() == 1) json["eos_token_id"] = c.eos_token_ids[0];
  if (c.eos_token_ids.size() > 1) json["eos_token_id"] = c.eos_token_ids;
  return json;
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

absl::StatusOr<LinearKind> ParseLinearKind(const std::string& name) {
  for (int k = 0; k < kNumLinearKinds; ++k)
    if (name == LinearName(static_cast<LinearKind>(k))) return static_cast<LinearKind>(k);
  return absl::InvalidArgumentError(
      StrCat("unknown target module \"", name,
             "\"; expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj or down_proj"));
}

int LinearOut(const LlamaConfig& c, LinearKind kind) {
  switch (kind) {
    case LinearKind::kQ:
      return c.q_dim();
    case LinearKind::kK:
    case LinearKind::kV:
      return c.kv_dim();
    case LinearKind::kO:
    case LinearKind::kDown:
      return c.hidden_size;
    case LinearKind::kGate:
    case LinearKind::kUp:
      return c.intermediate_size;
  }
  return 0;
}

int LinearIn(const LlamaConfig& c, LinearKind kind) {
  switch (kind) {
    case LinearKind::kO:
      return c.q_dim();
    case LinearKind::kDown:
      return c.intermediate_size;
    default:
      return c.hidden_size;
  }
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
        slots.push_back(static_cast<size_t>(l) * kNumLinearKinds + k);
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

absl::StatusOr<LlamaConfig> LlamaPreset(const std::string& name) {
  LlamaConfig c;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = true;
  if (name == "tiny") {
    c.hidden_size = 64;
    c.intermediate_size = 192;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.max_position_embeddings = 1024;
    c.rope_theta = 10000;
    return c;
  }
  if (name == "smollm2-135m") {
    c.hidden_size = 576;
    c.intermediate_size = 1536;
    c.num_hidden_layers = 30;
    c.num_attention_heads = 9;
    c.num_key_value_heads = 3;
    c.head_dim = 64;
    c.vocab_size = 49152;
    c.max_position_embeddings = 8192;
    c.rope_theta = 100000;
    return c;
  }
  return absl::InvalidArgumentError(
      StrCat("unknown preset \"", name, "\"; expected tiny or smollm2-135m"));
}

}  // namespace fedlora::common
