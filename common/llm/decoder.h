// Autoregressive generation over a KV cache: the prompt runs through the model once, then each new
// token costs one position's forward against the cached keys and values of the positions before.
//
// The forward is LlamaRunner's (llama.h) computed for new positions only, with the same layer
// functions (layers.h): RMSNorm, rotary tables, grouped-query attention over the layer's window
// (against the cache), SwiGLU, biases, q/k norms and LoRA / LoRA-SB terms, so the logits agree
// with LlamaRunner::NextTokenLogits to float rounding (tests/common/llm/decoder_test.cc checks
// this step by step on every family).
//
// Sampling is Hugging Face generate()'s: logits divided by the temperature, then the smallest set
// of most probable tokens whose probability reaches top_p (the token that crosses it included),
// then a draw; temperature 0 is greedy (the argmax, the lowest id on a tie).
#ifndef FEDLORA_COMMON_LLM_DECODER_H_
#define FEDLORA_COMMON_LLM_DECODER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "common/llm/llama.h"

namespace fedlora::common {

class Decoder {
 public:
  // `weights` and `adapter` (null: the base model) must outlive the decoder. The cache holds
  // `max_seq` positions (at most the model's max_position_embeddings). `threads` (0: the
  // machine's cores) share each step's products as LlamaRunner's do, with the same results for
  // any number; to generate for many prompts at once, run one decoder per thread instead.
  static absl::StatusOr<std::unique_ptr<Decoder>> Create(const LlamaWeights* weights,
                                                         const Adapter* adapter, int max_seq,
                                                         int threads = 0);
  ~Decoder();

  // Forgets the cached positions.
  void Reset();
  // Positions in the cache.
  int length() const;
  int max_seq() const;

  // Runs `ids` at the next positions, caches their keys and values, and returns the logits of
  // the token after the last of them ([vocab_size]; valid until the next call).
  absl::StatusOr<std::span<const float>> Append(std::span<const int32_t> ids);

  class Impl;

 private:
  explicit Decoder(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct SamplingOptions {
  int max_new_tokens = 32;
  double temperature = 0;  // 0: greedy
  double top_p = 1;        // nucleus mass, in (0, 1]
};

// The next token from `logits` (see the top of this file). `rng` is used only when sampling.
int32_t SampleToken(std::span<const float> logits, const SamplingOptions& options,
                    std::mt19937_64& rng);

// Generates after `prompt` (the cache is reset first) until a token of `eos` (which is kept) or
// max_new_tokens. `on_logits`, when set, sees each step's logits before the token is chosen.
absl::StatusOr<std::vector<int32_t>> Generate(
    Decoder& decoder, std::span<const int32_t> prompt, std::span<const int32_t> eos,
    const SamplingOptions& options, std::mt19937_64& rng,
    const std::function<void(std::span<const float>)>& on_logits = {});

// Generate for every prompt, in parallel over `threads` decoders (0: the machine's cores), each
// prompt i sampled with seed + i so that the result does not depend on the thread count. A prompt
// that does not fit the model with max_new_tokens is refused by its index.
absl::StatusOr<std::vector<std::vector<int32_t>>> GenerateAll(
    const LlamaWeights& weights, const Adapter* adapter,
    const std::vector<std::vector<int32_t>>& prompts, std::span<const int32_t> eos,
    const SamplingOptions& options, uint64_t seed = 0, int threads = 0);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_DECODER_H_
