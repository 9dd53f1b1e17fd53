// The rotation against the Walsh–Hadamard matrix built by Sylvester's construction, and the exact
// samplers against their closed forms.
#include "common/secagg/dp.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "common/secagg/crypto.h"

namespace fedlora::secagg {
namespace {

const std::string kSeed(32, 's');

TEST(RotationTest, IsHDxOverRootDAndItsInverse) {
  // Sylvester: H_1 = [1], H_2n = [[H, H], [H, −H]].
  constexpr size_t kD = 8;
  std::vector<std::vector<double>> h = {{1.0}};
  while (h.size() < kD) {
    const size_t n = h.size();
    std::vector<std::vector<double>> next(2 * n, std::vector<double>(2 * n));
    for (size_t i = 0; i < n; ++i)
      for (size_t j = 0; j < n; ++j) {
        next[i][j] = next[i][j + n] = next[i + n][j] = h[i][j];
        next[i + n][j + n] = -h[i][j];
      }
    h = next;
  }
  std::vector<uint64_t> bits(kD);
  ASSERT_TRUE(ExpandSeed(kSeed, 1, bits).ok());
  const std::vector<double> x = {0.5, -1.25, 3.0, 0.0, 2.0, -0.75, 1.0};  // padded to 8
  auto y = Rotate(x, kSeed);
  ASSERT_TRUE(y.ok());
  ASSERT_EQ(y->size(), kD);
  for (size_t i = 0; i < kD; ++i) {
    double expected = 0;
    for (size_t j = 0; j < x.size(); ++j) expected += h[i][j] * (bits[j] ? -x[j] : x[j]);
    EXPECT_NEAR((*y)[i], expected / std::sqrt(8.0), 1e-15) << i;
  }
  auto back = Unrotate(*y, kSeed, x.size());
  ASSERT_TRUE(back.ok());
  for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR((*back)[i], x[i], 1e-14);
  EXPECT_FALSE(Unrotate(std::vector<double>(6), kSeed, 6).ok());  // not a power of two
}

TEST(RotationTest, KeepsNormsAndSpreadsASpike) {
  std::vector<double> x(1000, 0.0);
  x[17] = 10.0;
  auto y = Rotate(x, kSeed);
  ASSERT_TRUE(y.ok());
  ASSERT_EQ(y->size(), 1024u);
  double norm = 0, largest = 0;
  for (double e : *y) {
    norm += e * e;
    largest = std::max(largest, std::abs(e));
  }
  EXPECT_NEAR(norm, 100.0, 1e-10);
  EXPECT_NEAR(largest, 10.0 / 32.0, 1e-12);  // every coordinate ±10/√1024
  auto back = Unrotate(*y, kSeed, 1000);
  for (size_t i = 0; i < 1000; ++i) EXPECT_NEAR((*back)[i], x[i], 1e-12);
}

// Unbiased, within 1, and the squared error's mean is Σ f(1 − f) ≤ d/4 (f the fractions).
TEST(SamplerTest, StochasticRoundingIsUnbiasedWithItsErrorBound) {
  const std::vector<double> x = {0.5, -0.5, 0.25, -1.75, 3.0, 0.1};
  constexpr double kScale = 2.0;  // scaled: 1, −1, 0.5, −3.5, 6, 0.2
  constexpr int kN = 100000;
  std::vector<double> mean(x.size(), 0.0);
  double error2 = 0;
  for (int n = 0; n < kN; ++n) {
    auto r = StochasticRound(x, kScale);
    ASSERT_TRUE(r.ok());
    for (size_t i = 0; i < x.size(); ++i) {
      const double v = x[i] * kScale, got = static_cast<double>((*r)[i]);
      ASSERT_LT(std::abs(got - v), 1.0) << i;
      mean[i] += got / kN;
      error2 += (got - v) * (got - v) / kN;
    }
  }
  double expected_error2 = 0;  // Σ f(1 − f): 0 + 0 + 0.25 + 0.25 + 0 + 0.16
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i] * kScale, f = v - std::floor(v);
    EXPECT_NEAR(mean[i], v, 5 * std::sqrt(f * (1 - f) / kN) + 1e-9) << i;
    expected_error2 += f * (1 - f);
  }
  EXPECT_NEAR(expected_error2, 0.66, 1e-12);
  EXPECT_NEAR(error2, expected_error2, 0.01);
  EXPECT_LE(expected_error2, x.size() / 4.0);
  EXPECT_FALSE(StochasticRound(std::vector<double>{NAN}, 1.0).ok());
  EXPECT_FALSE(StochasticRound(std::vector<double>{1e300}, 1.0).ok());
}

TEST(SamplerTest, BernoulliExpHasItsProbability) {
  constexpr int kN = 200000;
  for (const auto& [num, den] : std::vector<std::pair<int, int>>{{1, 3}, {3, 2}, {7, 1}}) {
    int ones = 0;
    for (int i = 0; i < kN; ++i) ones += BernoulliExp(num, den);
    const double p = std::exp(-static_cast<double>(num) / den);
    EXPECT_NEAR(static_cast<double>(ones) / kN, p, 5 * std::sqrt(p * (1 - p) / kN))
        << num << "/" << den;
  }
}

// Moments and tails of N_Z(0, σ²) against sums of exp(−k²/(2σ²)) over the integers.
TEST(SamplerTest, DiscreteGaussianMatchesItsClosedForm) {
  constexpr int kN = 100000;
  for (const auto& [num, den] :
       std::vector<std::pair<uint64_t, uint64_t>>{{9, 1}, {1, 4}, {2500, 7}}) {
    const double s2 = static_cast<double>(num) / den;
    double z = 0, second = 0, fourth = 0, tail = 0;
    const double sigma = std::sqrt(s2);
    for (int k = -2000; k <= 2000; ++k) {
      const double w = std::exp(-k * k / (2 * s2));
      z += w;
      second += k * k * w;
      fourth += static_cast<double>(k) * k * k * k * w;
      if (std::abs(k) >= 2 * sigma) tail += w;
    }
    const double var = second / z, p0 = 1 / z, p_tail = tail / z;
    double sum = 0, sum2 = 0;
    int zeros = 0, far = 0;
    for (int i = 0; i < kN; ++i) {
      auto x = DiscreteGaussian(num, den);
      ASSERT_TRUE(x.ok()) << x.status();
      sum += static_cast<double>(*x);
      sum2 += static_cast<double>(*x) * static_cast<double>(*x);
      zeros += *x == 0;
      far += std::abs(static_cast<double>(*x)) >= 2 * sigma;
    }
    const double mean = sum / kN, m2 = sum2 / kN;
    EXPECT_NEAR(mean, 0.0, 5 * std::sqrt(var / kN)) << s2;
    EXPECT_NEAR(m2, var, 5 * std::sqrt((fourth / z - var * var) / kN)) << s2;
    EXPECT_NEAR(static_cast<double>(zeros) / kN, p0, 5 * std::sqrt(p0 * (1 - p0) / kN)) << s2;
    EXPECT_NEAR(static_cast<double>(far) / kN, p_tail,
                5 * std::sqrt(p_tail * (1 - p_tail) / kN) + 1e-6)
        << s2;
  }
  EXPECT_FALSE(DiscreteGaussian(0, 1).ok());
  EXPECT_FALSE(DiscreteGaussian(1, 0).ok());
  EXPECT_FALSE(DiscreteGaussian(1, 1 << 20).ok());
}

}  // namespace
}  // namespace fedlora::secagg
