#include "common/tensor/linalg.h"

#include <gtest/gtest.h>

#include <random>

namespace fedlora::common {
namespace {

Eigen::MatrixXd Random(int rows, int cols, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal;
  Eigen::MatrixXd x(rows, cols);
  for (double& v : x.reshaped()) v = normal(rng);
  return x;
}

bool Orthonormal(const Eigen::MatrixXd& x) {
  return (x.transpose() * x - Eigen::MatrixXd::Identity(x.cols(), x.cols())).norm() < 1e-12;
}

TEST(LinalgTest, ThinSvdFactorsTallAndWideMatrices) {
  for (auto [m, n] : {std::pair{7, 4}, {4, 7}, {5, 5}}) {
    const Eigen::MatrixXd a = Random(m, n, m * 10 + n);
    const Svd svd = ThinSvd(a);
    const int p = std::min(m, n);
    ASSERT_EQ(svd.u.rows(), m);
    ASSERT_EQ(svd.u.cols(), p);
    ASSERT_EQ(svd.v.rows(), n);
    ASSERT_EQ(svd.v.cols(), p);
    EXPECT_LT((svd.u * svd.s.asDiagonal() * svd.v.transpose() - a).norm(), 1e-12 * a.norm());
    EXPECT_TRUE(Orthonormal(svd.u));
    EXPECT_TRUE(Orthonormal(svd.v));
    for (int i = 1; i < p; ++i) EXPECT_GE(svd.s(i - 1), svd.s(i));
    EXPECT_GE(svd.s(p - 1), 0);
    // σ² are the eigenvalues of AᵀA (or AAᵀ): a second, independent solver.
    const Eigen::MatrixXd gram =
        m < n ? Eigen::MatrixXd(a * a.transpose()) : Eigen::MatrixXd(a.transpose() * a);
    const Eigen::VectorXd lambda = EigenSymmetric(gram).values.reverse();
    for (int i = 0; i < p; ++i) EXPECT_NEAR(svd.s(i) * svd.s(i), lambda(i), 1e-10 * lambda(0));
    EXPECT_LT((SingularValues(a) - svd.s).norm(), 1e-12 * svd.s(0));
  }
  // By hand: diag(3, −2, 0.5) has singular values 3, 2, 0.5.
  const Eigen::Vector3d s = SingularValues(Eigen::Vector3d(3, -2, 0.5).asDiagonal());
  EXPECT_NEAR(s(0), 3, 1e-15);
  EXPECT_NEAR(s(1), 2, 1e-15);
  EXPECT_NEAR(s(2), 0.5, 1e-15);
}

TEST(LinalgTest, ThinQrFactorsTallAndWideMatrices) {
  for (auto [m, n] : {std::pair{8, 3}, {3, 8}}) {
    const Eigen::MatrixXd a = Random(m, n, m + n);
    const Qr qr = ThinQr(a);
    const int p = std::min(m, n);
    ASSERT_EQ(qr.q.rows(), m);
    ASSERT_EQ(qr.q.cols(), p);
    ASSERT_EQ(qr.r.rows(), p);
    ASSERT_EQ(qr.r.cols(), n);
    EXPECT_LT((qr.q * qr.r - a).norm(), 1e-12 * a.norm());
    EXPECT_TRUE(Orthonormal(qr.q));
    for (int i = 0; i < p; ++i)
      for (int j = 0; j < i; ++j) EXPECT_EQ(qr.r(i, j), 0) << i << "," << j;
  }
}

TEST(LinalgTest, SymmetricEigenAndFrobeniusDot) {
  // By hand: [[2, 1], [1, 2]] has eigenvalues 1 and 3, eigenvectors (1, −1)/√2 and (1, 1)/√2.
  Eigen::Matrix2d a;
  a << 2, 1, 1, 2;
  const SymmetricEigen eig = EigenSymmetric(a);
  EXPECT_NEAR(eig.values(0), 1, 1e-14);
  EXPECT_NEAR(eig.values(1), 3, 1e-14);
  EXPECT_NEAR(std::abs(eig.vectors(0, 1)), std::sqrt(0.5), 1e-14);
  EXPECT_NEAR(eig.vectors(0, 0) * eig.vectors(1, 0), -0.5, 1e-14);
  MatrixD x(2, 3), y(2, 3);
  x << 1, 2, 3, 4, 5, 6;
  y << 1, 0, -1, 2, 0, 0.5;
  EXPECT_DOUBLE_EQ(FrobeniusDot(x, y), 1 - 3 + 8 + 3);
}

}  // namespace
}  // namespace fedlora::common
