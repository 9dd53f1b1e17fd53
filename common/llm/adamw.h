// AdamW (Loshchilov & Hutter 2019) as torch.optim.AdamW computes it, in the manner of llm.c's
// gpt2_update: one flat loop over the trainable ranges of a parameter buffer whose gradients and
// two moments share its layout (the adapter's module table).
#ifndef FEDLORA_COMMON_LLM_ADAMW_H_
#define FEDLORA_COMMON_LLM_ADAMW_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace fedlora::common {

// [begin, end) ranges of a flat parameter buffer.
using ParameterRanges = std::vector<std::pair<size_t, size_t>>;

struct AdamWOptions {
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  // λ, decoupled: p ← p·(1 − lr·λ) before the Adam step
};

// Step t (1-based) at learning rate lr, for every index in `ranges` (the others are left alone):
//   g = grad_scale·grads[i];  m ← β1·m + (1 − β1)·g;  v ← β2·v + (1 − β2)·g²;
//   p ← p·(1 − lr·λ) − lr/(1 − β1^t) · m / (√v / √(1 − β2^t) + eps)
// in f32, as torch.optim.AdamW's single-tensor path orders it. grad_scale carries the clipping
// factor. params, grads, m and v have the same size.
void AdamWUpdate(std::span<float> params, std::span<const float> grads, std::span<float> m,
                 std::span<float> v, const ParameterRanges& ranges, double lr, int64_t t,
                 const AdamWOptions& options, float grad_scale = 1.0f);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_ADAMW_H_
