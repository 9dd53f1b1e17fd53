#include "common/llm/adamw.h"

#include <cmath>

namespace fedlora::common {

void AdamWUpdate(std::span<float> params, std::span<const float> grads, std::span<float> m,
                 std::span<float> v, const ParameterRanges& ranges, double lr, int64_t t,
                 const AdamWOptions& o, float grad_scale) {
  const double step = static_cast<double>(t);
  const float decay = static_cast<float>(1.0 - lr * o.weight_decay);
  const float b1 = static_cast<float>(o.beta1), b2 = static_cast<float>(o.beta2);
  const float step_size = static_cast<float>(lr / (1.0 - std::pow(o.beta1, step)));
  const float bias2 = static_cast<float>(std::sqrt(1.0 - std::pow(o.beta2, step)));
  const float eps = static_cast<float>(o.eps);
  for (const auto& [begin, end] : ranges)
    for (size_t i = begin; i < end; ++i) {
      const float g = grads[i] * grad_scale;
      m[i] = b1 * m[i] + (1.0f - b1) * g;
      v[i] = b2 * v[i] + (1.0f - b2) * g * g;
      params[i] = params[i] * decay - step_size * m[i] / (std::sqrt(v[i]) / bias2 + eps);
    }
}

}  // namespace fedlora::common
