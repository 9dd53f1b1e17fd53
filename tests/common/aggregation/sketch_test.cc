#include "common/aggregation/sketch.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "common/tensor/linalg.h"

namespace fedlora::common {
namespace {

MatrixD Gaussian(int rows, int cols, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  MatrixD x(rows, cols);
  for (double& v : x.reshaped()) v = normal(rng);
  return x;
}

MatrixD Orthonormal(int rows, int cols, std::mt19937_64& rng) {
  return ThinQr(Gaussian(rows, cols, rng)).q;
}

// U·diag(s)·Vᵀ with random orthonormal U, V.
MatrixD WithSpectrum(int m, int n, const Eigen::VectorXd& s, std::mt19937_64& rng) {
  const int k = static_cast<int>(s.size());
  return Orthonormal(m, k, rng) * s.asDiagonal() * Orthonormal(n, k, rng).transpose();
}

// The whole protocol as the coordinator runs it: each step, every client applies its G_k to the
// step's basis, the products are summed with weights p_k, and the next basis is the orthonormal
// basis of the sum.
TopFactors FederatedSketch(const std::vector<MatrixD>& gs, const std::vector<double>& p, int rank,
                           int oversampling, int power, uint64_t seed, MatrixD* last_basis) {
  const int l = rank + oversampling;
  MatrixD basis = RangeBasis(seed, 0, static_cast<int>(gs[0].cols()), l);
  for (int s = 0; s < SketchSteps(power); ++s) {
    const SketchStep step = SketchStepAt(s, power);
    MatrixD sum = p[0] * SketchProduct(step, gs[0], basis);
    for (size_t k = 1; k < gs.size(); ++k) sum += p[k] * SketchProduct(step, gs[k], basis);
    if (step == SketchStep::kProject) {
      *last_basis = basis;
      return FactorsFromProjection(basis, sum, rank);
    }
    basis = OrthonormalBasis(sum);
  }
  return {};
}

TEST(SketchTest, StepsRunRangePowerPairsThenProjection) {
  EXPECT_EQ(SketchSteps(0), 2);
  EXPECT_EQ(SketchStepAt(0, 0), SketchStep::kRange);
  EXPECT_EQ(SketchStepAt(1, 0), SketchStep::kProject);
  ASSERT_EQ(SketchSteps(2), 6);
  const SketchStep expected[] = {SketchStep::kRange, SketchStep::kTransposed,
                                 SketchStep::kPower, SketchStep::kTransposed,
                                 SketchStep::kPower, SketchStep::kProject};
  for (int s = 0; s < 6; ++s) EXPECT_EQ(SketchStepAt(s, 2), expected[s]) << s;
  EXPECT_EQ(SketchProductShape(SketchStep::kRange, 7, 5, 3).rows, 7);
  EXPECT_EQ(SketchProductShape(SketchStep::kTransposed, 7, 5, 3).rows, 5);
  EXPECT_EQ(SketchProductShape(SketchStep::kProject, 7, 5, 3).cols, 5);
}

TEST(SketchTest, TestMatrixIsStandardNormalAndDependsOnSeedAndModule) {
  const MatrixD omega = TestMatrix(42, 3, 400, 50);
  EXPECT_EQ(omega, TestMatrix(42, 3, 400, 50));
  EXPECT_NE(omega, TestMatrix(42, 4, 400, 50));
  EXPECT_NE(omega, TestMatrix(43, 3, 400, 50));
  // 20000 draws: the mean within 4 standard errors of 0, the variance and the fourth moment near
  // 1 and 3, and different columns nearly uncorrelated.
  const double n = static_cast<double>(omega.size());
  EXPECT_NEAR(omega.mean(), 0.0, 4.0 / std::sqrt(n));
  EXPECT_NEAR(omega.squaredNorm() / n, 1.0, 4.0 * std::sqrt(2.0 / n));
  EXPECT_NEAR(omega.array().square().square().sum() / n, 3.0, 4.0 * std::sqrt(96.0 / n));
  const MatrixD gram = omega.transpose() * omega / 400.0;
  EXPECT_LT((gram - MatrixD::Identity(50, 50)).cwiseAbs().maxCoeff(), 0.3);
  // The range step's basis: orthonormal columns spanning what Ω spans.
  const MatrixD basis = RangeBasis(42, 3, 400, 50);
  EXPECT_LT((basis.transpose() * basis - MatrixD::Identity(50, 50)).norm(), 1e-12);
  EXPECT_LT((omega - basis * (basis.transpose() * omega)).norm(), 1e-12 * omega.norm());
}

TEST(SketchTest, FederatedSketchOfAnExactlyLowRankSumIsExact) {
  std::mt19937_64 rng(1);
  // Three clients whose weighted sum has rank 5; each alone has higher rank, the sum does not.
  Eigen::VectorXd s(5);
  s << 9, 5, 3, 2, 1;
  const MatrixD g = WithSpectrum(60, 40, s, rng);
  const MatrixD noise = Gaussian(60, 40, rng);
  const std::vector<double> p = {0.5, 0.3, 0.2};
  const std::vector<MatrixD> gs = {g + 0.6 * noise, g - 0.5 * noise, g - 0.75 * noise};
  for (int power : {0, 1}) {
    MatrixD q;
    const TopFactors f = FederatedSketch(gs, p, 5, 3, power, 7, &q);
    EXPECT_LT((f.s - s).cwiseAbs().maxCoeff(), 1e-10) << power;
    EXPECT_LT((f.u * f.s.asDiagonal() * f.vt - g).norm(), 1e-10) << power;
    EXPECT_LT((f.u.transpose() * f.u - MatrixD::Identity(5, 5)).norm(), 1e-12);
    EXPECT_LT((f.vt * f.vt.transpose() - MatrixD::Identity(5, 5)).norm(), 1e-12);
  }
}

// Halko, Martinsson and Tropp (2011), Theorem 10.8 with t = e and u = √(2p log p) (their §10.3):
// with probability at least 1 − 3p⁻ᵖ, the range finder with k + p columns leaves
//   ‖(I − QQᵀ)A‖ ≤ (1 + 6√((k + p)·p·log p))·σ_{k+1} + 3√(k + p)·(Σ_{j>k} σ_j²)^½,
// and with q power iterations the bound for A's singular values raised to 2q + 1, then taken to
// the power 1/(2q + 1) (their Corollary 10.10's argument).
double RangeFinderBound(const Eigen::VectorXd& sigma, int k, int p, int q) {
  const Eigen::VectorXd t = sigma.unaryExpr([q](double s) { return std::pow(s, 2 * q + 1); });
  const double tail = t.tail(t.size() - k).squaredNorm();
  const double bound = (1 + 6 * std::sqrt((k + p) * p * std::log(p))) * t(k) +
                       3 * std::sqrt(static_cast<double>(k + p)) * std::sqrt(tail);
  return std::pow(bound, 1.0 / (2 * q + 1));
}

TEST(SketchTest, ErrorSingularValuesAndSubspaceWithinTheTheory) {
  const int m = 120, n = 90, r = 8, o = 8;
  std::mt19937_64 rng(2);
  Eigen::VectorXd sigma(n);
  // A slowly decaying spectrum with a gap after the rank: σ_j = 10/j, halved beyond j = r.
  for (int j = 0; j < n; ++j) sigma(j) = (j < r ? 10.0 : 5.0) / (j + 1.0);
  const MatrixD g = WithSpectrum(m, n, sigma, rng);
  // Four clients: G plus parts that cancel in the weighted sum.
  const std::vector<double> p = {0.4, 0.3, 0.2, 0.1};
  std::vector<MatrixD> gs;
  MatrixD rest = MatrixD::Zero(m, n);
  for (int k = 0; k < 3; ++k) {
    gs.push_back(g + Gaussian(m, n, rng));
    rest += p[k] * (gs.back() - g);
  }
  gs.push_back(g - rest / p[3]);
  const MatrixD u_r = ThinSvd(g).u.leftCols(r);
  double previous = INFINITY;
  for (int q : {0, 1, 2}) {
    for (uint64_t seed : {1, 2, 3}) {
      MatrixD basis;
      const TopFactors f = FederatedSketch(gs, p, r, o, q, seed, &basis);
      const double error = SingularValues(g - basis * basis.transpose() * g)(0);
      EXPECT_LE(error, RangeFinderBound(sigma, r, o, q)) << "q " << q << " seed " << seed;
      // Weyl: the sketch's singular values are G's projected on Q, so σ_j − error ≤ σ̂_j ≤ σ_j.
      for (int j = 0; j < r; ++j) {
        EXPECT_LE(f.s(j), sigma(j) * (1 + 1e-12));
        EXPECT_GE(f.s(j), sigma(j) - error - 1e-12);
      }
      // Wedin: sin of the largest principal angle between the top-r left subspaces ≤ error / gap.
      const double gap = f.s(r - 1) - sigma(r);
      ASSERT_GT(gap, 0) << "q " << q << " seed " << seed << " error " << error;
      const double sin_max = SingularValues(f.u - u_r * (u_r.transpose() * f.u))(0);
      EXPECT_LE(sin_max, error / gap + 1e-12) << "q " << q << " seed " << seed;
      if (seed == 1) {
        EXPECT_LE(error, previous * (1 + 1e-9)) << "more power iterations, larger error: q " << q;
        previous = error;
      }
    }
  }
  // Two power iterations on this spectrum: a subspace within a few degrees of the exact one.
  MatrixD basis;
  const TopFactors f = FederatedSketch(gs, p, r, o, 2, 1, &basis);
  EXPECT_LT(SingularValues(f.u - u_r * (u_r.transpose() * f.u))(0), 0.1);
}

}  // namespace
}  // namespace fedlora::common
