// The architecture of a Llama-family checkpoint, from its Hugging Face config.json.
//
// fedlora's trainer implements exactly the Llama decoder (RMSNorm, rotary embeddings in the
// rotate_half convention, grouped-query attention, SwiGLU, no biases) that SmolLM2, TinyLlama and
// Llama 2/3 share. Anything the trainer would silently compute differently — another
// architecture, rope scaling, biases, another activation — is refused with a message naming it.
#ifndef FEDLORA_COMMON_LLM_LLAMA_CONFIG_H_
#define FEDLORA_COMMON_LLM_LLAMA_CONFIG_H_

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor/adapter.h"

namespace fedlora::common {

inline constexpr char kModelConfigFile[] = "config.json";

struct LlamaConfig {
  int hidden_size = 0;              // H: width of the residual stream.
  int intermediate_size = 0;        // I: width of the SwiGLU MLP.
  int num_hidden_layers = 0;        // L
  int num_attention_heads = 0;      // query heads
  int num_key_value_heads = 0;      // key/value heads (grouped-query attention); divides the above
  int head_dim = 0;                 // D; hidden_size / num_attention_heads unless config.json says
  int vocab_size = 0;               // V
  int max_position_embeddings = 0;  // longest sequence the checkpoint was trained for
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;  // the LM head reuses embed_tokens when set
  int bos_token_id = -1;             // -1 when config.json has none
  std::vector<int> eos_token_ids;    // config.json may give one id or a list

  int q_dim() const { return num_attention_heads * head_dim; }
  int kv_dim() const { return num_key_value_heads * head_dim; }
};

// Parses and checks config.json's object; `origin` names it in errors.
absl::StatusOr<LlamaConfig> ParseLlamaConfig(const nlohmann::json& json, const std::string& origin);
// Reads <dir>/config.json.
absl::StatusOr<LlamaConfig> ReadLlamaConfig(const std::filesystem::path& dir);
// config.json as Hugging Face transformers writes it for LlamaForCausalLM.
nlohmann::json LlamaConfigJson(const LlamaConfig& config);

// The seven linear layers of a decoder layer that LoRA can adapt, in the order of the forward pass.
enum class LinearKind { kQ, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumLinearKinds = 7;
// "q_proj", ..., "down_proj": the names PEFT's target_modules use.
const char* LinearName(LinearKind kind);
// The module path of layer `layer`'s linear, e.g. "model.layers.3.self_attn.q_proj".
std::string LinearPath(int layer, LinearKind kind);
// Parses "q_proj" etc.; the error lists the valid names.
absl::StatusOr<LinearKind> ParseLinearKind(const std::string& name);
// [out, in] of the linear's weight.
int LinearOut(const LlamaConfig& config, LinearKind kind);
int LinearIn(const LlamaConfig& config, LinearKind kind);

// Where each module of `adapter` sits in the model, as layer·7 + kind, in the adapter's order. A
// module that is not a linear of this model, or has another shape, is refused with both shapes.
absl::StatusOr<std::vector<size_t>> AdapterSlots(const LlamaConfig& config, const Adapter& adapter);

// The architecture of a preset: "tiny" (2 layers of width 64; vocab_size 0, for the tokenizer to
// decide) or "smollm2-135m" (HuggingFaceTB/SmolLM2-135M's config.json). The error lists both.
absl::StatusOr<LlamaConfig> LlamaPreset(const std::string& name);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_LLAMA_CONFIG_H_
