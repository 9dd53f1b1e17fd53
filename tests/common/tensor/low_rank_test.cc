#include "common/tensor/low_rank.h"

#include <gtest/gtest.h>

#include <random>

#include "common/tensor/linalg.h"

namespace fedlora::common {
namespace {

MatrixD RandomMatrix(int rows, int cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  MatrixD x(rows, cols);
  for (double& v : x.reshaped()) v = normal(rng);
  return x;
}

TEST(LowRankTest, MatchesTheDenseSvdAndEckartYoung) {
  for (auto [m, n, r, k] : {std::tuple{40, 30, 12, 5}, {25, 60, 8, 8}, {10, 12, 20, 4}}) {
    const MatrixD u = RandomMatrix(m, r, m), v = RandomMatrix(r, n, n);
    const MatrixD dense = u * v;
    const Eigen::VectorXd sigma = SingularValues(dense);
    const TruncatedProduct t = TruncateProduct(u, v, k);
    const int p = std::min({r, m, n});
    ASSERT_EQ(t.singular.size(), p);
    for (int i = 0; i < p; ++i) EXPECT_NEAR(t.singular(i), sigma(i), 1e-9 * sigma(0));
    // Eckart–Young: the rank-k error is the energy of the dropped singular values.
    const double dropped = sigma.tail(sigma.size() - k).squaredNorm();
    EXPECT_NEAR((dense - t.b * t.a).squaredNorm(), dropped, 1e-9 * dense.squaredNorm());
    EXPECT_NEAR(t.retained_energy, 1 - dropped / dense.squaredNorm(), 1e-12);
    // A has orthonormal rows, as the export promises.
    EXPECT_LT((t.a * t.a.transpose() - MatrixD::Identity(k, k)).norm(), 1e-10);
  }
}

TEST(LowRankTest, FullRankKeepsTheProductAndZeroIsHandled) {
  const MatrixD u = RandomMatrix(20, 6, 1), v = RandomMatrix(6, 15, 2);
  const TruncatedProduct t = TruncateProduct(u, v, 100);  // capped at 6
  EXPECT_EQ(t.a.rows(), 6);
  EXPECT_LT((u * v - t.b * t.a).norm(), 1e-10 * (u * v).norm());
  EXPECT_DOUBLE_EQ(t.retained_energy, 1.0);
  const TruncatedProduct z = TruncateProduct(MatrixD::Zero(5, 3), MatrixD::Zero(3, 4), 2);
  EXPECT_DOUBLE_EQ(z.retained_energy, 1.0);
  EXPECT_EQ(z.b.norm(), 0.0);
}

}  // namespace
}  // namespace fedlora::common
