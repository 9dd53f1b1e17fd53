// The architecture of a Llama-family checkpoint, from its Hugging Face config.json.
//
// fedlora's trainer implements the decoder that Llama 2/3.x, TinyLlama, SmolLM2, Mistral and
// Qwen2/2.5/3 share — RMSNorm, rotary embeddings in the rotate_half convention, grouped-query
// attention, SwiGLU — with each family's variations as transformers computes them:
//   llama    rope_scaling linear | dynamic | llama3; attention_bias (q,k,v,o), mlp_bias
//   mistral  sliding_window (every layer attends to the last `sliding_window` positions)
//   qwen2    biases on q, k and v; sliding window on layers ≥ max_window_layers when enabled
//   qwen3    RMSNorm over each head of q and k before RoPE (q_norm, k_norm); explicit head_dim;
//            attention_bias; sliding window as qwen2
// Anything the trainer would silently compute differently — another architecture, another rope
// scaling, partial rotary embeddings, another activation — is refused with a message naming it.
#ifndef FEDLORA_COMMON_LLM_LLAMA_CONFIG_H_
#define FEDLORA_COMMON_LLM_LLAMA_CONFIG_H_

#include <array>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor/adapter.h"

namespace fedlora::common {

inline constexpr char kModelConfigFile[] = "config.json";

// How rotary frequencies are scaled (config.json's rope_scaling, transformers' rope_type).
struct RopeScaling {
  enum class Type { kNone, kLinear, kDynamic, kLlama3 };
  Type type = Type::kNone;
  double factor = 1;
  double low_freq_factor = 1;                // llama3
  double high_freq_factor = 4;               // llama3
  int original_max_position_embeddings = 0;  // llama3
};

// The seven linear layers of a decoder layer that LoRA can adapt, in the order of the forward pass.
enum class LinearKind { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumLinearKinds = 7;
// Where layer `layer`'s linear `kind` sits among the model's [L·7] linears (layer-major).
inline size_t LinearSlot(int layer, LinearKind kind) {
  return static_cast<size_t>(layer) * kNumLinearKinds + static_cast<size_t>(kind);
}

struct LlamaConfig {
  std::string model_type = "llama";  // llama, mistral, qwen2 or qwen3
  int hidden_size = 0;               // H: width of the residual stream.
  int intermediate_size = 0;         // I: width of the SwiGLU MLP.
  int num_hidden_layers = 0;         // L
  int num_attention_heads = 0;       // query heads
  int num_key_value_heads = 0;       // key/value heads (grouped-query attention); divides the above
  int head_dim = 0;                  // D; hidden_size / num_attention_heads unless config.json says
  int vocab_size = 0;                // V
  int max_position_embeddings = 0;   // longest sequence the checkpoint was trained for
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;  // the LM head reuses embed_tokens when set
  RopeScaling rope_scaling;
  std::array<bool, kNumLinearKinds> bias{};  // which linears carry a (frozen) bias
  bool qk_norm = false;                      // Qwen3: RMSNorm over each head of q and k
  // Per layer: attend to the last `window` positions (the query's own included); 0 = all before.
  // Empty when no layer has a window.
  std::vector<int> layer_window;
  int bos_token_id = -1;           // -1 when config.json has none
  std::vector<int> eos_token_ids;  // config.json may give one id or a list

  int q_dim() const { return num_attention_heads * head_dim; }
  int kv_dim() const { return num_key_value_heads * head_dim; }
  int window(int layer) const { return layer_window.empty() ? 0 : layer_window[layer]; }
  bool has_bias(LinearKind kind) const { return bias[static_cast<int>(kind)]; }
};

// Rotary inverse frequencies (head_dim / 2 of them) for a batch of `seq_len` positions, as
// transformers' rope_init_fn computes them for the config's rope_scaling. Only `dynamic` depends on
// `seq_len`: beyond max_position_embeddings its base grows with the sequence (the NTK rule; a
// fresh model's value — transformers keeps the largest length seen so far between calls).
std::vector<double> RopeInverseFrequencies(const LlamaConfig& config, int seq_len);

// cos and sin of position·inv_freq_i (in double, rounded once) for positions [0, positions) of a
// sequence of `seq_len`, [positions, head_dim / 2] each: the tables the forward rotates with.
void RopeTables(const LlamaConfig& config, int seq_len, int positions, std::vector<float>& cos,
                std::vector<float>& sin);

// Parses and checks config.json's object; `origin` names it in errors. Every size is capped,
// generously for the largest published checkpoints (llama_config.cc says which): a value over its
// cap is refused with the cap, so a config alone never sizes an allocation fedlora cannot make.
absl::StatusOr<LlamaConfig> ParseLlamaConfig(const nlohmann::json& json, const std::string& origin);
// Reads <dir>/config.json.
absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::filesystem::path& dir);
// transformers' class of a model_type: "Qwen3ForCausalLM" for "qwen3".
const char* ArchitectureName(const std::string& model_type);
// config.json as Hugging Face transformers writes it for the config's model_type.
nlohmann::json LlamaConfigJson(const LlamaConfig& config);

// "q_proj", ..., "down_proj": the names PEFT's target_modules use.
const char* LinearName(LinearKind kind);
// The module path of layer `layer`'s linear, e.g. "model.layers.3.self_attn.q_proj".
std::string LinearPath(int layer, LinearKind kind);
// Parses "q_proj" etc., each of `names` in order; the error lists the valid names.
absl::StatusOr<std::vector<LinearKind>> ParseLinearKinds(const std::vector<std::string>& names);
// [out, in] of the linear's weight.
int LinearOut(const LlamaConfig& config, LinearKind kind);
int LinearIn(const LlamaConfig& config, LinearKind kind);

// The size of the frozen model a config describes: every tensor of its checkpoint (the LM head
// once when tied), as LlamaWeights holds them.
struct ModelSize {
  int64_t parameters = 0;
  int64_t f32_bytes = 0;  // parameters · 4
};
// Computed from the config's sizes in checked int64 arithmetic, for any config: a negative size,
// or a product or sum that overflows int64, is an error naming the sizes and the term. A config
// ParseLlamaConfig accepts always fits: its caps keep the count under 2^55.
absl::StatusOr<ModelSize> ModelSizeOf(const LlamaConfig& config);

// Where each module of `adapter` sits in the model, as layer·7 + kind, in the adapter's order. A
// module that is not a linear of this model, or has another shape, is refused with both shapes.
absl::StatusOr<std::vector<size_t>> AdapterSlots(const LlamaConfig& config, const Adapter& adapter);

// The architecture of a preset: "tiny" (a Llama of 2 layers of width 64), its family variants
// "tiny-llama3" (Llama 3.2's rope scaling, with an original context of 64 so that it matters),
// "tiny-mistral" (a sliding window of 32), "tiny-qwen2" (q/k/v biases), "tiny-qwen3" (q/k norms,
// head_dim 32 ≠ 64/4) — vocab_size 0 in these, for the tokenizer to decide — or the shapes of
// real checkpoints: "smollm2-135m", "llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b". The error lists
// them all.
absl::StatusOr<LlamaConfig> LlamaPreset(const std::string& name);
// The names LlamaPreset knows, comma-separated.
std::string LlamaPresetNames();

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_LLAMA_CONFIG_H_
