// LoRA-FAIR's solver, checked against the objective as the paper states it on dense m×n matrices: a
// dense gradient (itself checked by finite differences), the closed-form optimum at λ = 0, the
// stationarity relation of ALGORITHMS.md, and many-start dense gradient descent for the global
// optimum.
#include "common/aggregation/lora_fair.h"

#include <gtest/gtest.h>

#include <random>

namespace fedlora::common {
namespace {

// The problem as the paper writes it: a dense target ΔW* (m×n), Ā (r×n), B̄ (m×r).
struct Dense {
  MatrixD target, a_bar, b_bar;
  double lambda;

  double Objective(const MatrixD& b) const {
    const MatrixD w = b * a_bar;
    return 1 - (w.array() * target.array()).sum() / (w.norm() * target.norm()) +
           lambda * (b - b_bar).squaredNorm();
  }
  // d/dB of the objective: cos = ⟨D, W⟩/(‖D‖‖W‖) with W = B·Ā, so ∂cos/∂W = D/(‖D‖‖W‖) −
  // cos·W/‖W‖², ∂W/∂B = ·Āᵀ.
  MatrixD Gradient(const MatrixD& b) const {
    const MatrixD w = b * a_bar;
    const double cos = (w.array() * target.array()).sum() / (w.norm() * target.norm());
    const MatrixD dcos_dw = target / (target.norm() * w.norm()) - cos * w / w.squaredNorm();
    return -dcos_dw * a_bar.transpose() + 2 * lambda * (b - b_bar);
  }
  LoraFairProblem LowRank() const {
    return {target * a_bar.transpose(), a_bar * a_bar.transpose(), b_bar, target.squaredNorm()};
  }
};

MatrixD Random(int rows, int cols, std::mt19937_64& rng, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  MatrixD x(rows, cols);
  for (double& v : x.reshaped()) v = normal(rng);
  return x;
}

// A target of rank K·r that Ā's row space cannot hold, like the sum of several clients' deltas.
Dense MakeProblem(int m, int n, int r, int clients, double lambda, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Dense d;
  d.target = MatrixD::Zero(m, n);
  d.a_bar = MatrixD::Zero(r, n);
  d.b_bar = MatrixD::Zero(m, r);
  for (int k = 0; k < clients; ++k) {
    MatrixD a = Random(r, n, rng, 1.0 / std::sqrt(n)), b = Random(m, r, rng, 0.3);
    d.target += b * a / clients;
    d.a_bar += a / clients;
    d.b_bar += b / clients;
  }
  d.lambda = lambda;
  return d;
}

TEST(LoraFairTest, DenseGradientOfTheTestMatchesFiniteDifferences) {
  Dense d = MakeProblem(7, 9, 3, 4, 0.01, 1);
  std::mt19937_64 rng(2);
  const MatrixD b = d.b_bar + Random(7, 3, rng, 0.1);
  const MatrixD g = d.Gradient(b);
  for (int i = 0; i < 7; ++i) {
    for (int j = 0; j < 3; ++j) {
      MatrixD hi = b, lo = b;
      hi(i, j) += 1e-6;
      lo(i, j) -= 1e-6;
      EXPECT_NEAR((d.Objective(hi) - d.Objective(lo)) / 2e-6, g(i, j),
                  1e-7 * std::max(1.0, std::abs(g(i, j))));
    }
  }
  // And the low-rank objective and gradient of the library agree with the dense ones away from the
  // optimum.
  MatrixD lg;
  EXPECT_NEAR(LoraFairObjective(d.LowRank(), d.lambda, b, &lg), d.Objective(b), 1e-12);
  EXPECT_LT((lg - g).norm(), 1e-10 * g.norm());
}

TEST(LoraFairTest, SolutionIsStationaryAndBeatsFedIt) {
  for (uint64_t seed : {3, 4, 5}) {
    for (double lambda : {0.01, 0.1, 1.0}) {
      Dense d = MakeProblem(40, 30, 4, 5, lambda, seed);
      LoraFairSolution s = SolveLoraFair(d.LowRank(), {lambda});
      EXPECT_TRUE(s.converged) << "seed " << seed << " lambda " << lambda;
      EXPECT_NEAR(s.objective, d.Objective(s.b), 1e-12);
      EXPECT_NEAR(s.fedit_objective, d.Objective(d.b_bar), 1e-12);
      EXPECT_LT(s.objective, s.fedit_objective);
      // Stationary: the dense gradient vanishes, relative to the scale 1/‖B̄‖ of the objective's
      // gradient.
      EXPECT_LT(d.Gradient(s.b).norm() * d.b_bar.norm(), 1e-8)
          << "seed " << seed << " lambda " << lambda;
      // ALGORITHMS.md: B' = (β·G + 2λ·B̄)(α·S + 2λ·I)⁻¹ with β = 1/(N√v), α = u/(N v^{3/2}).
      const LoraFairProblem p = d.LowRank();
      const double n = d.target.norm(), w = (s.b * d.a_bar).norm();
      const double u = (s.b.array() * p.g.array()).sum();
      const double beta = 1 / (n * w), alpha = u / (n * w * w * w);
      const MatrixD expected = (beta * p.g + 2 * lambda * p.b_bar) *
                               (alpha * p.s + 2 * lambda * MatrixD::Identity(4, 4)).inverse();
      EXPECT_LT((expected - s.b).norm() / s.b.norm(), 1e-7);
    }
  }
}

TEST(LoraFairTest, WithoutPenaltyTheOptimumIsTheProjectionOntoTheRowSpaceOfABar) {
  // λ = 0: max_B cos(D, B·Ā) = ‖D·P‖/‖D‖ with P = Āᵀ(ĀĀᵀ)⁻¹Ā the projector onto Ā's row space.
  Dense d = MakeProblem(25, 20, 3, 6, 0.0, 8);
  const MatrixD proj = d.a_bar.transpose() * (d.a_bar * d.a_bar.transpose()).inverse() * d.a_bar;
  const double best = 1 - (d.target * proj).norm() / d.target.norm();
  LoraFairSolution s = SolveLoraFair(d.LowRank(), {0.0});
  EXPECT_NEAR(s.objective, best, 1e-10);
}

TEST(LoraFairTest, ReachesTheGlobalOptimumFoundByManyStartDenseDescent) {
  // A small problem where dense gradient descent from many random starts can be run to convergence.
  Dense d = MakeProblem(6, 5, 2, 3, 0.05, 9);
  LoraFairSolution s = SolveLoraFair(d.LowRank(), {0.05});
  std::mt19937_64 rng(10);
  double best = INFINITY;
  for (int start = 0; start < 20; ++start) {
    MatrixD b = d.b_bar + Random(6, 2, rng, start == 0 ? 0.0 : 1.0);
    double f = d.Objective(b), step = 1.0;
    for (int it = 0; it < 20000 && step > 1e-14; ++it) {
      const MatrixD g = d.Gradient(b);
      const MatrixD next = b - step * g;
      const double fn = d.Objective(next);
      if (fn < f) {
        b = next;
        f = fn;
        step *= 1.2;
      } else {
        step *= 0.5;
      }
    }
    best = std::min(best, f);
  }
  EXPECT_LE(s.objective, best + 1e-9);
  EXPECT_NEAR(s.objective, best, 1e-6);
}

TEST(LoraFairTest, DegenerateProblemsKeepFedIt) {
  // ΔW* = 0 (for instance every client's B is still 0): cos is 0 whatever B is, so ΔB = 0 is
  // optimal.
  Dense d = MakeProblem(5, 4, 2, 2, 0.01, 11);
  LoraFairProblem p = d.LowRank();
  p.g.setZero();
  p.target_norm_sq = 0;
  LoraFairSolution s = SolveLoraFair(p, {0.01});
  EXPECT_TRUE(s.converged);
  EXPECT_EQ(s.b, p.b_bar);
  EXPECT_DOUBLE_EQ(s.objective, 1.0);
  // B̄·Ā = 0 while ΔW* ≠ 0 (B̄ = 0, or B̄ in the null space of S): cos only sees B̄'s part in Ā's row
  // space, which is 0, and the objective approaches its infimum 1 − max cos only as that part
  // shrinks to 0. No minimiser exists: B̄ is kept and the solution says it did not converge.
  Dense z = MakeProblem(5, 4, 2, 2, 0.01, 12);
  z.a_bar.row(1).setZero();
  z.b_bar.col(0).setZero();
  ASSERT_EQ((z.b_bar * z.a_bar).norm(), 0.0);
  for (const Dense& d : {z, [] {
                           Dense o = MakeProblem(5, 4, 2, 2, 0.01, 13);
                           o.b_bar.setZero();
                           return o;
                         }()}) {
    LoraFairSolution u = SolveLoraFair(d.LowRank(), {0.01});
    EXPECT_FALSE(u.converged);
    EXPECT_EQ(u.b, d.b_bar);
    EXPECT_DOUBLE_EQ(u.objective, 1.0);
    // Points along the best direction, ever closer to 0, keep improving: the infimum is not
    // attained.
    const MatrixD dir = d.LowRank().g;
    EXPECT_LT(d.Objective(1e-3 * dir), d.Objective(1e-1 * dir));
  }
}

// The row-space variant (for sums that cannot give ‖ΔW*‖): when every client's A_k is Ā — so ΔW*
// lies in Ā's row space — it solves the exact problem; when the A_k differ, it solves the dense
// problem whose target is ΔW* projected on Ā's row space (ΔW*·Āᵀ(ĀĀᵀ)⁻¹Ā, formed densely here).
TEST(LoraFairTest, RowSpaceVariantSolvesTheProjectedTarget) {
  Dense same = MakeProblem(12, 10, 3, 4, 0.01, 7);
  std::mt19937_64 rng(8);
  same.target = (same.b_bar + Random(12, 3, rng, 0.1)) * same.a_bar;  // Σ p_k B_k Ā
  const LoraFairOptions options{.lambda = 0.01, .tolerance = 1e-12};
  const LoraFairSolution exact = SolveLoraFair(same.LowRank(), options);
  const LoraFairSolution rows = SolveLoraFairInRowSpace(same.target * same.a_bar.transpose(),
                                                        same.a_bar, same.b_bar, options);
  EXPECT_LT((rows.b - exact.b).norm(), 1e-8 * exact.b.norm());
  EXPECT_NEAR(rows.objective, same.Objective(rows.b), 1e-12);

  Dense d = MakeProblem(12, 10, 3, 4, 0.01, 9);
  Dense projected = d;
  const MatrixD p =
      d.a_bar.transpose() * (d.a_bar * d.a_bar.transpose()).inverse() * d.a_bar;  // n×n projector
  projected.target = d.target * p;
  ASSERT_LT(projected.target.norm(), 0.99 * d.target.norm());  // the A_k do differ
  const LoraFairSolution r =
      SolveLoraFairInRowSpace(d.target * d.a_bar.transpose(), d.a_bar, d.b_bar, options);
  EXPECT_NEAR(r.objective, projected.Objective(r.b), 1e-10);
  EXPECT_LT(projected.Gradient(r.b).norm(), 1e-7);
}

}  // namespace
}  // namespace fedlora::common
