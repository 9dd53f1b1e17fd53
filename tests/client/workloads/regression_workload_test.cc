// The regression workload's DP-SGD against full-batch descent, its independent reference: with
// every example sampled, no noise and a clip no gradient reaches, a DP-SGD step is a descent step
// (the mean of the per-example gradients is the batch gradient); with one example and a tiny clip,
// a clip at half its gradient's norm halves the descent step.
#include "client/workloads/regression_workload.h"

#include <gtest/gtest.h>

#include "common/tensor/adapter.h"
#include "tests/test_util.h"

namespace fedlora::client {
namespace {

common::Adapter Start(const RegressionWorkload& w, bool lora_sb, uint64_t seed) {
  std::vector<testing::ModuleSpec> specs;
  for (const v1::ModuleSpec& m : w.modules())
    specs.push_back({m.name(), 3, m.in_features(), m.out_features(), 0.7, lora_sb});
  return testing::RandomAdapter(specs, seed);
}

Eigen::VectorXd Change(const common::Adapter& after, const common::Adapter& before) {
  Eigen::VectorXd d(after.values().size());
  for (size_t k = 0; k < after.values().size(); ++k)
    d(static_cast<Eigen::Index>(k)) = double(after.values()[k]) - before.values()[k];
  return d;
}

class DpSgdTest : public ::testing::TestWithParam<bool> {};  // LoRA-SB or LoRA

TEST_P(DpSgdTest, WithoutClippingOrNoiseIsFullBatchDescent) {
  RegressionOptions o;
  o.layers = 2, o.in_features = 6, o.out_features = 5, o.examples = 40;
  o.privacy.dp = {.noise_multiplier = 0, .clip = 1e9, .sample_rate = 1.0};
  const RegressionWorkload w(o);
  const common::Adapter start = Start(w, GetParam(), 3);
  common::Adapter plain = start, priv = start;
  w.Descend(plain, 1, 0.05);
  common::GaussianNoise noise = common::GaussianNoise::ForTestingOnly(1);
  std::mt19937_64 sampler(1);
  w.DescendPrivately(priv, 1, 0.05, noise, sampler);
  const Eigen::VectorXd want = Change(plain, start), got = Change(priv, start);
  ASSERT_GT(want.norm(), 0);
  EXPECT_LT((got - want).norm(), 1e-5 * want.norm());
}

TEST_P(DpSgdTest, OneExampleIsClippedToTheClipNorm) {
  RegressionOptions o;
  o.layers = 2, o.in_features = 6, o.out_features = 5, o.examples = 1;
  const double lr = 0.01;
  const common::Adapter start = Start(RegressionWorkload(o), GetParam(), 4);
  common::Adapter plain = start;
  RegressionWorkload(o).Descend(plain, 1, lr);
  const Eigen::VectorXd want = Change(plain, start);  // lr·g
  // A clip at half the example's gradient norm halves the step.
  o.privacy.dp = {.noise_multiplier = 0, .clip = 0.5 * want.norm() / lr, .sample_rate = 1.0};
  common::Adapter priv = start;
  common::GaussianNoise noise = common::GaussianNoise::ForTestingOnly(2);
  std::mt19937_64 sampler(2);
  RegressionWorkload(o).DescendPrivately(priv, 1, lr, noise, sampler);
  EXPECT_LT((Change(priv, start) - 0.5 * want).norm(), 1e-4 * want.norm());
}

TEST_P(DpSgdTest, NoiseHasStddevSigmaCOverTheExpectedSample) {
  RegressionOptions o;
  o.layers = 3, o.in_features = 20, o.out_features = 16, o.examples = 50;
  const double sigma = 2.0, clip = 0.3, q = 0.2, lr = 1.0;
  // About 10 examples' gradients, each clipped to C, against noise of σC per coordinate over a few
  // hundred coordinates: what moves the factors is mostly the noise.
  o.privacy.dp = {.noise_multiplier = sigma, .clip = clip, .sample_rate = q};
  const RegressionWorkload w(o);
  const common::Adapter start = Start(w, GetParam(), 5);
  common::Adapter priv = start;
  common::GaussianNoise noise = common::GaussianNoise::ForTestingOnly(3);
  std::mt19937_64 sampler(3);
  w.DescendPrivately(priv, 1, lr, noise, sampler);
  const Eigen::VectorXd d = Change(priv, start);
  const double expected_sample = q * 50, stddev = lr * sigma * clip / expected_sample;
  double sq = 0, n = 0;
  for (Eigen::Index k = 0; k < d.size(); ++k) {
    if (d(k) == 0) continue;  // frozen A and B of LoRA-SB
    sq += (d(k) / stddev) * (d(k) / stddev);
    ++n;
  }
  // The clipped data gradients (norm ≤ ~10·C/(qN)) can raise the mean square by < 0.2.
  EXPECT_LT(std::abs(sq / n - 1), 5 * std::sqrt(2 / n) + 0.2) << n;
}

INSTANTIATE_TEST_SUITE_P(Factors, DpSgdTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "LoraSb" : "Lora"; });

}  // namespace
}  // namespace fedlora::client
