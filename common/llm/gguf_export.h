// A Llama-family checkpoint, or a LoRA adapter of one, as the GGUF files llama.cpp (and Ollama,
// which runs llama.cpp) load — what llama.cpp's convert_hf_to_gguf.py and convert_lora_to_gguf.py
// write for these families, without Python:
//   llama, mistral  architecture "llama": Q and K rows permuted from Hugging Face's rotate_half
//                   layout to llama.cpp's interleaved one; Llama 3's rope scaling as rope_freqs
//   qwen2, qwen3    architectures "qwen2", "qwen3" (NeoX rope, no permutation); q/k/v biases,
//                   q_norm/k_norm
// The tokenizer travels in the file: byte-level BPE ("gpt2" with the pre-tokenizer llama.cpp has
// for the tokenizer.json's regexes: llama-bpe, qwen2, smollm, deepseek-v3, gpt-2) or Llama 2's
// SentencePiece-style BPE ("llama": scores from the merge ranks, byte tokens typed). What llama.cpp
// would compute differently is refused before a byte is written: another pre-tokenizer or
// normalizer, dynamic rope scaling, biases the architecture does not load.
#ifndef FEDLORA_COMMON_LLM_GGUF_EXPORT_H_
#define FEDLORA_COMMON_LLM_GGUF_EXPORT_H_

#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/env.h"
#include "common/llm/gguf.h"
#include "common/llm/llama.h"
#include "common/tensor/adapter.h"

namespace fedlora::common {

struct GgufExport {
  std::string architecture;  // general.architecture
  std::string tokenizer;     // "gpt2/llama-bpe", "llama", ...
  size_t tensors = 0;
  std::vector<std::string> notes;  // what a user should know (a sliding window, a folded scale)
};

// Whether the model in `model_dir` can be exported (its architecture, rope scaling and tokenizer,
// and a checkpoint that config.json describes), reading only the safetensors headers of its
// weights: the error says why not.
absl::Status CheckGgufExport(const std::filesystem::path& model_dir);

// `weights` (a model whose config.json, tokenizer.json and tokenizer_config.json are in
// `model_dir`) as a GGUF file: what ExportModelGguf writes once it has merged the adapter.
absl::StatusOr<GgufExport> ExportWeightsGguf(const LlamaWeights& weights,
                                             const std::filesystem::path& model_dir, GgmlType type,
                                             const std::filesystem::path& out,
                                             Env* env = Env::Default());

// The model in `model_dir` (config.json, safetensors weights, tokenizer.json) with `adapter`, if
// not null, merged into its weights, written atomically to `out` with 2-D weights as `type` (Q8_0
// falls back to F16 for rows that are not a multiple of 32; norms, biases and rope factors stay
// F32).
absl::StatusOr<GgufExport> ExportModelGguf(const std::filesystem::path& model_dir,
                                           const Adapter* adapter, GgmlType type,
                                           const std::filesystem::path& out,
                                           Env* env = Env::Default());

// `adapter` (of the model in `model_dir`, whose config.json decides the architecture) as a
// llama.cpp LoRA adapter (general.type "adapter", adapter.type "lora"), F32, written atomically to
// `out`:
// "<base tensor>.lora_a" [r, in] and ".lora_b" [out, r] per module. LoRA-SB's R is folded into B.
// llama.cpp scales each module by adapter.lora.alpha / r: when every module shares r and PEFT's
// scaling s = alpha / r, alpha is written as PEFT's; otherwise (rsLoRA, rank or alpha patterns)
// each module's s is folded into its B and alpha is 0, which llama.cpp reads as a scale of 1.
absl::StatusOr<GgufExport> ExportLoraGguf(const std::filesystem::path& model_dir,
                                          const Adapter& adapter, const std::filesystem::path& out,
                                          Env* env = Env::Default());

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_GGUF_EXPORT_H_
