#include "common/secagg/quantise.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "common/secagg/dp.h"
#include "common/secagg/params.h"

namespace fedlora::secagg {
namespace {

v1::SecAggConfig ConfigFor(size_t length, double clip, double z, int clients) {
  const Quantisation q = *PlanQuantisation(length, clip, z, clients, clients);
  v1::SecAggConfig c;
  c.set_rotation_seed(std::string(32, 'q'));
  SetQuantisation(q, c);
  return c;
}

std::vector<double> RandomVector(size_t n, double norm, std::mt19937_64& rng) {
  std::normal_distribution<double> g;
  std::vector<double> v(n);
  double s = 0;
  for (double& x : v) {
    x = g(rng);
    s += x * x;
  }
  for (double& x : v) x *= norm / std::sqrt(s);
  return v;
}

double Distance(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(s);
}

// Σ Encode mod 2^bits, decoded.
std::vector<double> SumOf(const std::vector<std::vector<double>>& xs, const v1::SecAggConfig& c) {
  std::vector<uint64_t> sum(RotatedLength(static_cast<size_t>(c.length())), 0);
  for (const auto& x : xs) {
    auto e = Encode(x, c);
    EXPECT_TRUE(e.ok()) << e.status();
    EXPECT_EQ(e->clamped, 0);
    for (size_t i = 0; i < sum.size(); ++i)
      sum[i] = (sum[i] + e->words[i]) & ((uint64_t{1} << c.bits()) - 1);
  }
  return *Decode(sum, c);
}

TEST(PackWordsTest, RoundTripsAtEveryWidth) {
  std::mt19937_64 rng(1);
  for (int bits : {1, 7, 8, 20, 33, 62}) {
    std::vector<uint64_t> w(37);
    for (uint64_t& x : w) x = rng() & ((uint64_t{1} << bits) - 1);
    const std::string packed = PackWords(w, bits);
    EXPECT_EQ(packed.size(), (37 * bits + 7) / 8);
    EXPECT_EQ(*UnpackWords(packed, bits, 37), w) << bits;
    EXPECT_FALSE(UnpackWords(packed + "x", bits, 37).ok());
  }
  std::string one = PackWords(std::vector<uint64_t>{1, 0, 1}, 1);  // 3 bits of a byte
  EXPECT_EQ(one, std::string(1, '\x05'));
  one[0] |= 0x80;  // a padding bit set
  EXPECT_FALSE(UnpackWords(one, 1, 3).ok());
}

// Without noise, the decoded sum of n clients' clipped values is within n·√rotated/scale of the
// true sum (each rounding moves a rotated coordinate by less than 1; the rotation keeps norms),
// whatever their signs — a negative sum is read back as negative, not wrapped.
TEST(QuantiseTest, TheSumIsWithinTheRoundingBound) {
  std::mt19937_64 rng(7);
  const int n = 5;
  const v1::SecAggConfig c = ConfigFor(1000, 2.0, 0, n);
  std::vector<std::vector<double>> xs;
  std::vector<double> sum(1000, 0.0);
  for (int k = 0; k < n; ++k) {
    xs.push_back(RandomVector(1000, 1.5, rng));  // within the clip with the −1 below
    if (k == 0) xs[0][3] = -1.0;                 // a coordinate that sums negative
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += xs[k][i];
  }
  const std::vector<double> got = SumOf(xs, c);
  const double bound = n * std::sqrt(1024.0) / c.scale();
  EXPECT_LT(Distance(got, sum), bound);
  EXPECT_GT(Distance(got, sum), 0);  // the rounding did happen
  EXPECT_LT(got[3], 0);
  EXPECT_NEAR(got[3], sum[3], bound);
}

// Clipping is flat L2: a vector three times the clip comes back scaled to it.
TEST(QuantiseTest, ClipsToTheBound) {
  std::mt19937_64 rng(8);
  const v1::SecAggConfig c = ConfigFor(300, 1.0, 0, 3);
  const std::vector<double> x = RandomVector(300, 3.0, rng);
  auto e = Encode(x, c);
  ASSERT_TRUE(e.ok());
  EXPECT_NEAR(e->norm, 3.0, 1e-12);
  std::vector<double> want = x;
  for (double& v : want) v /= 3.0;
  EXPECT_LT(Distance(SumOf({x}, c), want), std::sqrt(512.0) / c.scale());
  EXPECT_FALSE(Encode(std::vector<double>(299, 0.0), c).ok());
  std::vector<double> nan = x;
  nan[5] = NAN;
  EXPECT_FALSE(Encode(nan, c).ok());
}

// Stochastic rounding is unbiased: the mean of many decodes of one value is the value.
TEST(QuantiseTest, RoundingIsUnbiased) {
  v1::SecAggConfig c = ConfigFor(4, 1.0, 0, 3);
  c.set_scale(2.0);  // coarse, so that rounding is large: x·scale = 0.7 → 0 or 1
  const std::vector<double> x = {0.35, 0, 0, 0};
  double mean = 0;
  const int trials = 4000;
  for (int i = 0; i < trials; ++i) mean += SumOf({x}, c)[0] / trials;
  // Per trial the value is within ±1/scale of x; σ of the mean ≤ 0.5/√trials.
  EXPECT_NEAR(mean, 0.35, 5 * 0.5 / std::sqrt(trials));
}

// With noise, each client adds N_Z(0, σ_l²) per rotated coordinate: read back through the
// orthogonal rotation, a zero update has per-coordinate variance σ_l²/scale² and mean 0.
TEST(QuantiseTest, NoiseHasThePlannedVariance) {
  const v1::SecAggConfig c = ConfigFor(4096, 1.0, 1.0, 4);
  const double sigma = std::sqrt(static_cast<double>(c.noise_num()) / c.noise_den()) / c.scale();
  EXPECT_NEAR(sigma, 1.0 / 2, 1e-3);  // z·clip/√expected
  const std::vector<double> got = SumOf({std::vector<double>(4096, 0.0)}, c);
  double m = 0, v = 0;
  for (double x : got) m += x / 4096;
  for (double x : got) v += (x - m) * (x - m) / 4095;
  EXPECT_NEAR(m, 0, 5 * sigma / 64);
  EXPECT_NEAR(v, sigma * sigma, 5 * sigma * sigma * std::sqrt(2.0 / 4095));
}

}  // namespace
}  // namespace fedlora::secagg
