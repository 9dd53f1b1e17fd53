// DP-SGD's pieces for a sketch answer, by hand: the basis check against spectral norms computed
// here, clipping against the clip factor's definition, and the noise's scale against σC/N.
#include "common/privacy/private_sketch.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

namespace fedlora::common {
namespace {

TEST(PrivateSketchTest, BasesThatStretchAreRefused) {
  MatrixD orthonormal = MatrixD::Zero(4, 2);
  orthonormal(0, 0) = 1;
  orthonormal(3, 1) = 1;
  MatrixD shrinking = 0.5 * orthonormal;
  EXPECT_TRUE(CheckSketchBases(std::vector<MatrixD>{orthonormal, shrinking, MatrixD()}).ok());
  // Frobenius norm 1, spectral norm 1: still fine. Spectral norm 1.5 is not.
  MatrixD stretching = orthonormal;
  stretching(0, 0) = 1.5;
  const absl::Status s = CheckSketchBases(std::vector<MatrixD>{orthonormal, stretching});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), ::testing::HasSubstr("module 1 has spectral norm 1."));
}

TEST(PrivateSketchTest, RecordsAreClippedByTheirFlatNormOverModules) {
  std::vector<MatrixD> sums = {MatrixD::Zero(1, 2), MatrixD::Zero(2, 1)};
  MatrixD a(1, 2), b(2, 1);
  a << 3, 0;
  b << 0, 4;
  // The record's gradient has norm 10 (its products are what the bases made of it); clip 2
  // scales the products by 2/(10 + 1e-6).
  AddClippedRecord(std::vector<MatrixD>{a, b}, 10.0, 2.0, sums);
  const double f = 2.0 / (10.0 + 1e-6);
  EXPECT_DOUBLE_EQ(sums[0](0, 0), 3 * f);
  EXPECT_DOUBLE_EQ(sums[1](1, 0), 4 * f);
  // Under the clip: added whole.
  AddClippedRecord(std::vector<MatrixD>{a, b}, 1.0, 2.0, sums);
  EXPECT_DOUBLE_EQ(sums[0](0, 0), 3 * f + 3);
  EXPECT_DOUBLE_EQ(sums[1](1, 0), 4 * f + 4);
}

TEST(PrivateSketchTest, NoisyMeanAddsStddevThenDivides) {
  std::vector<MatrixD> sums = {MatrixD::Constant(100, 50, 8.0), MatrixD::Constant(30, 20, -4.0)};
  GaussianNoise noise = GaussianNoise::ForTestingOnly(11);
  const double stddev = 3.0, records = 4.0;
  NoisyMean(sums, stddev, records, noise);
  double sum = 0, sq = 0, n = 0;
  for (const auto& [m, value] : {std::pair{&sums[0], 8.0}, {&sums[1], -4.0}}) {
    for (double x : m->reshaped()) {
      const double z = (x * records - value) / stddev;  // standard normal if right
      sum += z;
      sq += z * z;
      ++n;
    }
  }
  EXPECT_NEAR(sum / n, 0.0, 4 / std::sqrt(n));
  EXPECT_NEAR(sq / n, 1.0, 4 * std::sqrt(2 / n));
}

}  // namespace
}  // namespace fedlora::common
