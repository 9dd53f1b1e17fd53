// AdamW against torch.optim.AdamW's algorithm as its documentation states it, computed here in
// double: θ ← θ − γλθ; m ← β1·m + (1 − β1)·g; v ← β2·v + (1 − β2)·g²; m̂ = m/(1 − β1^t);
// v̂ = v/(1 − β2^t); θ ← θ − γ·m̂/(√v̂ + ε). And a first step worked out by hand.
#include "common/llm/adamw.h"

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace fedlora::common {
namespace {

TEST(AdamWTest, FirstStepWorkedOutByHand) {
  // t = 1: m̂ = g and v̂ = g², so θ ← θ·(1 − γλ) − γ·g/(|g| + ε).
  // θ = 1, g = 0.25, γ = 0.1, λ = 0.5: 1·0.95 − 0.1·0.25/(0.25 + 1e-8) = 0.85 + 4e-9.
  // θ = −2, g = −4, grad_scale 0.5 (so g = −2): −2·0.95 + 0.1·2/(2 + 1e-8) = −1.8 − 5e-10.
  std::vector<float> params = {1.0f, -2.0f}, m(2, 0.0f), v(2, 0.0f);
  const std::vector<float> grads = {0.5f, -4.0f};
  AdamWUpdate(params, grads, m, v, {{0, 2}}, 0.1, 1, {.weight_decay = 0.5}, 0.5f);
  // In f32: 1 − 0.999f is 1.3e-5 off 0.001, which moves v by as much and the step by half.
  EXPECT_NEAR(params[0], 0.85, 1e-6);
  EXPECT_NEAR(params[1], -1.8, 1e-6);
  EXPECT_FLOAT_EQ(m[0], 0.1f * 0.25f);          // (1 − β1)·g
  EXPECT_NEAR(v[1], 0.001 * 4.0, 2e-5 * 4e-3);  // (1 − β2)·g²
}

TEST(AdamWTest, FollowsTorchsAlgorithmOverSeveralSteps) {
  const AdamWOptions o{.beta1 = 0.8, .beta2 = 0.95, .eps = 1e-6, .weight_decay = 0.1};
  const std::vector<float> start = {0.3f, -1.2f, 5.0f, 7.0f, 0.01f, -0.4f};
  const ParameterRanges ranges = {{0, 2}, {4, 6}};  // 2 and 3 are not trained
  const std::vector<std::vector<float>> grads = {{0.5f, -0.1f, 9.0f, 9.0f, 2.0f, 0.0f},
                                                 {-0.3f, -0.2f, 9.0f, 9.0f, 1.5f, 1e-4f},
                                                 {0.05f, 0.4f, 9.0f, 9.0f, -3.0f, -0.2f}};
  const double lrs[] = {0.01, 0.02, 0.005};
  const float scales[] = {1.0f, 0.5f, 1.0f};
  std::vector<float> params = start, m(6, 0.0f), v(6, 0.0f);
  std::vector<double> theta(start.begin(), start.end()), mr(6, 0.0), vr(6, 0.0);
  for (int t = 1; t <= 3; ++t) {
    AdamWUpdate(params, grads[t - 1], m, v, ranges, lrs[t - 1], t, o, scales[t - 1]);
    for (int i : {0, 1, 4, 5}) {
      const double g = static_cast<double>(grads[t - 1][i]) * scales[t - 1], lr = lrs[t - 1];
      theta[i] -= lr * o.weight_decay * theta[i];
      mr[i] = o.beta1 * mr[i] + (1 - o.beta1) * g;
      vr[i] = o.beta2 * vr[i] + (1 - o.beta2) * g * g;
      const double m_hat = mr[i] / (1 - std::pow(o.beta1, t));
      const double v_hat = vr[i] / (1 - std::pow(o.beta2, t));
      theta[i] -= lr * m_hat / (std::sqrt(v_hat) + o.eps);
      EXPECT_NEAR(params[i], theta[i], 1e-6 * (1 + std::abs(theta[i]))) << "step " << t << " " << i;
    }
  }
  for (int i : {2, 3}) {
    EXPECT_EQ(params[i], start[i]) << i;
    EXPECT_EQ(m[i], 0.0f) << i;
    EXPECT_EQ(v[i], 0.0f) << i;
  }
}

}  // namespace
}  // namespace fedlora::common
