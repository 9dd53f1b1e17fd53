#include "common/privacy/dp.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

double NormalCdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }

// The distribution tests use the seeded stream so they are repeatable; it is the same sampler with
// another key.
TEST(GaussianNoiseTest, SamplesAreStandardNormal) {
  auto noise = std::make_unique<GaussianNoise>(GaussianNoise::ForTestingOnly(2026));
  const int n = 400000;
  std::vector<double> x(n);
  double sum = 0, sq = 0, fourth = 0;
  for (double& v : x) {
    v = noise->Sample();
    sum += v;
    sq += v * v;
    fourth += v * v * v * v;
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  // 5-sigma bounds: mean ~ N(0, 1/n), variance ~ N(1, 2/n), fourth moment ~ N(3, 96/n).
  EXPECT_LT(std::abs(mean), 5 / std::sqrt(n));
  EXPECT_LT(std::abs(var - 1), 5 * std::sqrt(2.0 / n));
  EXPECT_LT(std::abs(fourth / n - 3), 5 * std::sqrt(96.0 / n));
  // Kolmogorov–Smirnov against Φ: the 99.9% critical value is 1.95/√n.
  std::sort(x.begin(), x.end());
  double ks = 0;
  for (int i = 0; i < n; i += 97) ks = std::max(ks, std::abs((i + 1.0) / n - NormalCdf(x[i])));
  EXPECT_LT(ks, 1.95 / std::sqrt(n));
}

// NoisyMean at `expected` 1: the noise it adds.
TEST(GaussianNoiseTest, AddedNoiseHasTheRequestedScalePerCoordinateAndInNorm) {
  auto noise = std::make_unique<GaussianNoise>(GaussianNoise::ForTestingOnly(7));
  const int dims = 64, draws = 20000;
  const double stddev = 0.37;
  std::vector<double> sum(dims, 0), sq(dims, 0), norm_sq;
  for (int t = 0; t < draws; ++t) {
    std::vector<float> v(dims, 1.0f);
    NoisyMean(std::span<float>(v), stddev, 1.0, *noise);
    double ns = 0;
    for (int i = 0; i < dims; ++i) {
      const double e = v[i] - 1.0;
      sum[i] += e;
      sq[i] += e * e;
      ns += e * e;
    }
    norm_sq.push_back(ns);
  }
  // Every coordinate: mean 0 and variance σ² within 5 standard errors (64 coordinates, so ~1e-5
  // false alarms).
  for (int i = 0; i < dims; ++i) {
    EXPECT_LT(std::abs(sum[i] / draws), 5 * stddev / std::sqrt(draws)) << i;
    EXPECT_LT(std::abs(sq[i] / draws / (stddev * stddev) - 1), 5 * std::sqrt(2.0 / draws)) << i;
  }
  // The squared norm is σ²·χ²(64): mean 64σ², variance 2·64·σ⁴.
  double mean_ns = 0;
  for (double v : norm_sq) mean_ns += v / draws;
  EXPECT_LT(std::abs(mean_ns - dims * stddev * stddev),
            5 * std::sqrt(2.0 * dims) * stddev * stddev / std::sqrt(draws));
}

TEST(GaussianNoiseTest, SecureGeneratorsNeverRepeatAndTestSeedsDo) {
  auto a = GaussianNoise::Secure(), b = GaussianNoise::Secure();
  std::vector<double> xa(8), xb(8);
  for (int i = 0; i < 8; ++i) {
    xa[i] = a->Sample();
    xb[i] = b->Sample();
  }
  EXPECT_NE(xa, xb);
  auto c = GaussianNoise::ForTestingOnly(42), d = GaussianNoise::ForTestingOnly(42),
       e = GaussianNoise::ForTestingOnly(43);
  for (int i = 0; i < 8; ++i) {
    const double vc = c.Sample();
    EXPECT_EQ(vc, d.Sample());
    EXPECT_NE(vc, e.Sample());
  }
}

// The noisy mean against its formula, (sum + stddev·z)/expected, with z drawn here from a second
// stream of the same seed, value by value; and its noise against N(0, (stddev/expected)²).
TEST(NoisyMeanTest, AddsOneSampleToEachValueThenDividesByTheExpectedCount) {
  const std::vector<double> given = {1.5, -2.0, 0.0, 7.25, 3.0};
  const double stddev = 0.8, expected = 2.5;
  std::vector<double> doubles = given;
  std::vector<float> floats(given.begin(), given.end());
  GaussianNoise noise = GaussianNoise::ForTestingOnly(5),
                reference = GaussianNoise::ForTestingOnly(5);
  NoisyMean(std::span<double>(doubles), stddev, expected, noise);
  for (size_t i = 0; i < given.size(); ++i)
    EXPECT_EQ(doubles[i], (given[i] + stddev * reference.Sample()) / expected) << i;
  GaussianNoise noise2 = GaussianNoise::ForTestingOnly(6),
                reference2 = GaussianNoise::ForTestingOnly(6);
  NoisyMean(std::span<float>(floats), stddev, expected, noise2);
  for (size_t i = 0; i < given.size(); ++i)
    EXPECT_EQ(floats[i], static_cast<float>((given[i] + stddev * reference2.Sample()) / expected))
        << i;

  std::vector<double> zeros(40000, 0.0);
  NoisyMean(std::span<double>(zeros), stddev, expected, noise);
  double sum = 0, sq = 0;
  for (double x : zeros) {
    const double z = x * expected / stddev;  // standard normal if right
    sum += z;
    sq += z * z;
  }
  const double n = static_cast<double>(zeros.size());
  EXPECT_NEAR(sum / n, 0.0, 5 / std::sqrt(n));
  EXPECT_NEAR(sq / n, 1.0, 5 * std::sqrt(2 / n));
}

TEST(ClipTest, ClipsTheFlatNormAcrossTensorsExactly) {
  std::vector<float> a = {3, 0}, b = {0, 4};  // flat norm 5
  std::vector<std::span<float>> t = {a, b};
  EXPECT_DOUBLE_EQ(FlatL2Norm(t), 5.0);
  EXPECT_DOUBLE_EQ(ClipFlatL2(t, 1.0), 5.0);
  const double factor = 1.0 / (5.0 + 1e-6);
  EXPECT_FLOAT_EQ(a[0], static_cast<float>(3 * factor));
  EXPECT_FLOAT_EQ(b[1], static_cast<float>(4 * factor));
  EXPECT_NEAR(FlatL2Norm(t), 1.0, 1e-6);
  // Below the bound, values are left alone (factor min(1, ·)).
  std::vector<float> c = {0.3f, 0.4f};
  std::vector<std::span<float>> u = {c};
  ClipFlatL2(u, 1.0);
  EXPECT_EQ(c, (std::vector<float>{0.3f, 0.4f}));
}

TEST(AdaptiveClipperTest, FollowsAndrewEtAlWithoutNoise) {
  // σ_b = 0 makes the rule deterministic: b̄ is the unclipped fraction, C ← C·exp(−η(b̄ − γ)).
  auto clipper = AdaptiveClipper::Create({1.0, 0.5, 0.2, 0.0}, 4);
  ASSERT_TRUE(clipper.ok());
  auto noise = GaussianNoise::ForTestingOnly(1);
  const double half[] = {0.5, 2, 3, 0.1};  // two of four unclipped: b̄ = γ, C stays
  clipper->Update(half, noise);
  EXPECT_DOUBLE_EQ(clipper->clip(), 1.0);
  const double all[] = {0.5, 0.2, 0.3, 0.1};  // all unclipped: b̄ = 1, C shrinks by e^{−0.2·0.5}
  clipper->Update(all, noise);
  EXPECT_DOUBLE_EQ(clipper->clip(), std::exp(-0.1));
  const double none[] = {5, 6, 7, 8};  // none unclipped: b̄ = 0, C grows by e^{0.1}
  clipper->Update(none, noise);
  EXPECT_NEAR(clipper->clip(), 1.0, 1e-15);
  // Fewer clients than expected arrived: the denominator stays m = 4 (1 unclipped of 2 → b̄ = 0.5 +
  // 0/4).
  const double two[] = {0.1, 9};
  clipper->Update(two, noise);
  EXPECT_NEAR(clipper->clip(), 1.0, 1e-15);
}

TEST(AdaptiveClipperTest, SplitsTheNoiseBetweenCountAndUpdate) {
  auto clipper = AdaptiveClipper::Create({}, 100);  // σ_b = m/20 = 5
  ASSERT_TRUE(clipper.ok());
  EXPECT_DOUBLE_EQ(clipper->count_stddev(), 5.0);
  // z_Δ = (z⁻² − (2σ_b)⁻²)^(−½): for z = 1, (1 − 1/100)^(−½).
  EXPECT_DOUBLE_EQ(*clipper->UpdateNoiseMultiplier(1.0), 1 / std::sqrt(0.99));
  EXPECT_THAT(clipper->UpdateNoiseMultiplier(10.0).status().message(),
              HasSubstr("must be below 2*sigma_b = 10"));
  EXPECT_THAT(AdaptiveClipper::Create({-1}, 10).status().message(),
              HasSubstr("initial clip is -1"));
  // With count noise, the clip moves by at most the bounded exponent: b̄ is clamped to [0, 1].
  auto noisy = AdaptiveClipper::Create({1.0, 0.5, 0.2, 1000.0}, 4);
  auto noise = GaussianNoise::ForTestingOnly(5);
  const double norms[] = {1, 1, 1, 1};
  noisy->Update(norms, noise);
  EXPECT_GE(noisy->clip(), std::exp(-0.1) - 1e-15);
  EXPECT_LE(noisy->clip(), std::exp(0.1) + 1e-15);
}

}  // namespace
}  // namespace fedlora::common
