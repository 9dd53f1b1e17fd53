#include "common/privacy/privacy_accountant.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

// A_α = E_{z~N(0,σ²)} [((1−q) + q·exp((2z − 1)/(2σ²)))^α], the α-th moment of the likelihood ratio
// of (1−q)·N(0,σ²) + q·N(1,σ²) against N(0,σ²), by Simpson's rule on [−40σ, 40σ + 1]: independent
// of both series.
double RdpByQuadrature(double q, double sigma, double alpha) {
  const double lo = -40 * sigma, hi = 40 * sigma + 1;
  const int n = 400000;
  const double h = (hi - lo) / n;
  double sum = 0;
  for (int i = 0; i <= n; ++i) {
    const double z = lo + i * h;
    const double density = std::exp(-z * z / (2 * sigma * sigma)) / (sigma * std::sqrt(2 * M_PI));
    const double ratio = (1 - q) + q * std::exp((2 * z - 1) / (2 * sigma * sigma));
    const double w = (i == 0 || i == n) ? 1 : (i % 2 ? 4 : 2);
    sum += w * density * std::pow(ratio, alpha);
  }
  return std::log(sum * h / 3) / (alpha - 1);
}

TEST(PrivacyAccountantTest, ReproducesTheReferenceValues) {
  // ALGORITHMS.md: σ 1.5, q 0.04, 2250 steps, δ 1e-5, Opacus orders → ε = 7.32911117143 at α = 3.9.
  auto spent = EpsilonFor(0.04, 1.5, 2250, 1e-5);
  ASSERT_TRUE(spent.ok()) << spent.status();
  EXPECT_NEAR(spent->epsilon, 7.32911117143, 1e-9);
  EXPECT_DOUBLE_EQ(spent->order, 3.9);
  // RDP of q 0.01, σ 2.5, 50 steps at α = 2.5, 5, 50 (rtol 1e-4).
  const double alphas[] = {2.5, 5, 50};
  const double expected[] = {1.08548710e-03, 2.18075656e-03, 2.38460375e-02};
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(50 * SampledGaussianRdp(0.01, 2.5, alphas[i]), expected[i], 1e-4 * expected[i])
        << alphas[i];
  }
  // Target ε 8, δ 1e-5, q 0.04, 2250 steps → σ ≈ 1.416, and that σ indeed spends at most 8.
  auto sigma = NoiseMultiplierFor(8, 0.04, 2250, 1e-5);
  ASSERT_TRUE(sigma.ok());
  EXPECT_NEAR(*sigma, 1.416, 5e-4);
  EXPECT_LE(EpsilonFor(0.04, *sigma, 2250, 1e-5)->epsilon, 8.0);
  EXPECT_GT(EpsilonFor(0.04, *sigma * (1 - 1e-5), 2250, 1e-5)->epsilon,
            8.0);  // and is the smallest such σ
}

TEST(PrivacyAccountantTest, SeriesAgreeWithNumericalIntegration) {
  for (double q : {0.01, 0.1, 0.5}) {
    for (double sigma : {0.8, 1.5, 4.0}) {
      for (double alpha : {1.5, 2.0, 3.7, 8.0, 12.5}) {
        const double rdp = SampledGaussianRdp(q, sigma, alpha);
        EXPECT_NEAR(rdp, RdpByQuadrature(q, sigma, alpha), 1e-7 + 1e-6 * rdp)
            << "q " << q << " sigma " << sigma << " alpha " << alpha;
      }
    }
  }
}

TEST(PrivacyAccountantTest, EdgeCasesAndComposition) {
  EXPECT_EQ(SampledGaussianRdp(0, 1, 5), 0);
  EXPECT_TRUE(std::isinf(SampledGaussianRdp(0.1, 0, 5)));
  EXPECT_DOUBLE_EQ(SampledGaussianRdp(1, 2, 5), 5 / 8.0);  // α/(2σ²): the unsampled Gaussian
  // Steps compose additively; a heterogeneous history is the sum of its parts.
  RdpAccountant a, b;
  ASSERT_TRUE(a.AddSteps(0.02, 1.1, 100).ok());
  ASSERT_TRUE(a.AddSteps(0.05, 2.0, 40).ok());
  for (int i = 0; i < 100; ++i) ASSERT_TRUE(b.AddSteps(0.02, 1.1, 1).ok());
  for (int i = 0; i < 40; ++i) ASSERT_TRUE(b.AddSteps(0.05, 2.0, 1).ok());
  for (size_t i = 0; i < a.orders().size(); ++i)
    EXPECT_NEAR(a.rdp()[i], b.rdp()[i], 1e-12 * (1 + a.rdp()[i]));
  EXPECT_NEAR(a.Spent(1e-5)->epsilon, b.Spent(1e-5)->epsilon, 1e-12);
  // More noise, fewer steps or a smaller δ-budget never spend less privacy.
  EXPECT_LT(EpsilonFor(0.04, 2.0, 2250, 1e-5)->epsilon, EpsilonFor(0.04, 1.5, 2250, 1e-5)->epsilon);
  EXPECT_LT(EpsilonFor(0.04, 1.5, 1000, 1e-5)->epsilon, EpsilonFor(0.04, 1.5, 2250, 1e-5)->epsilon);
  EXPECT_LT(EpsilonFor(0.04, 1.5, 2250, 1e-3)->epsilon, EpsilonFor(0.04, 1.5, 2250, 1e-5)->epsilon);
  EXPECT_TRUE(std::isinf(EpsilonFor(0.04, 0, 10, 1e-5)->epsilon));
  // The default orders are Opacus': 1.1 … 10.9 by 0.1, then 12 … 63.
  const auto orders = DefaultRdpOrders();
  ASSERT_EQ(orders.size(), 99u + 52u);
  EXPECT_DOUBLE_EQ(orders.front(), 1.1);
  EXPECT_DOUBLE_EQ(orders[98], 10.9);
  EXPECT_DOUBLE_EQ(orders.back(), 63);
}

TEST(PrivacyAccountantTest, BadArgumentsAreRefused) {
  RdpAccountant a;
  EXPECT_THAT(a.AddSteps(1.5, 1, 1).message(), HasSubstr("sample rate is 1.5"));
  EXPECT_THAT(a.AddSteps(0.1, -1, 1).message(), HasSubstr("noise multiplier is -1"));
  EXPECT_THAT(a.AddSteps(0.1, 1, -3).message(), HasSubstr("steps is -3"));
  EXPECT_THAT(a.Spent(0).status().message(), HasSubstr("delta is 0"));
  EXPECT_THAT(NoiseMultiplierFor(-1, 0.1, 10, 1e-5).status().message(),
              HasSubstr("target epsilon is -1"));
  EXPECT_THAT(NoiseMultiplierFor(1e-9, 0.5, 1e6, 1e-5).status().message(),
              HasSubstr("no noise multiplier"));
}

// Kairouz, Liu, Steinke 2021, Proposition 14, by hand: n = 2, σ_l = 1 gives τ = 10·e^(−π²) and
// s = √2, so with Δ₂ = 1 the three bounds at α = 2 are ½ + τd, ½ + √2·Δ₁·τ + τ²d and
// (1/√2 + τ√d)² = ½ + √(2d)·τ + τ²d: d = 1 takes the first, d = 4 the second, and d = 4 with
// Δ₁ = 10 the third.
TEST(DistributedDiscreteGaussianTest, Proposition14ByHand) {
  const double tau = 10 * std::exp(-M_PI * M_PI);
  EXPECT_NEAR(DistributedDiscreteGaussianRdp(2, 1, 1, 1, 2, 1), 0.5 + tau, 1e-15);
  EXPECT_NEAR(DistributedDiscreteGaussianRdp(2, 1, 1, 1, 2, 4),
              0.5 + std::sqrt(2.0) * tau + 4 * tau * tau, 1e-15);
  EXPECT_NEAR(DistributedDiscreteGaussianRdp(2, 1, 10, 1, 2, 4),
              0.5 + std::sqrt(8.0) * tau + 4 * tau * tau, 1e-15);
  // One client: τ = 0 and it is the continuous Gaussian's α·Δ²/(2σ²).
  EXPECT_DOUBLE_EQ(DistributedDiscreteGaussianRdp(7, 3, 9, 2, 1, 100), 7 * 9 / (2 * 4.0));
  // Many clients with a wide σ_l: the sum's σ² = nσ_l², and τ vanishes.
  EXPECT_NEAR(DistributedDiscreteGaussianRdp(10, 100, 1e4, 50, 100, 1e6),
              10 * 1e4 / (2 * 100 * 2500.0), 1e-12);
  EXPECT_TRUE(std::isinf(DistributedDiscreteGaussianRdp(2, 1, 1, 0, 3, 1)));
}

// AddRdp composes like AddSteps: the Gaussian's RDP added by hand gives AddSteps' ε.
TEST(DistributedDiscreteGaussianTest, AddRdpComposesWithTheGaussian) {
  RdpAccountant by_steps, by_rdp;
  ASSERT_TRUE(by_steps.AddSteps(1, 1.3, 3).ok());
  for (int i = 0; i < 3; ++i) by_rdp.AddRdp([](double a) { return a / (2 * 1.3 * 1.3); });
  EXPECT_NEAR(by_steps.Spent(1e-5)->epsilon, by_rdp.Spent(1e-5)->epsilon, 1e-12);
}

}  // namespace
}  // namespace fedlora::common
