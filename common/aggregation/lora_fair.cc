#include "common/aggregation/lora_fair.h"

#include <algorithm>
#include <cmath>
#include <deque>

#include "common/tensor/linalg.h"

namespace fedlora::common {
namespace {

// The problem in the eigenbasis of S: X = B'·V, so ‖B'Ā‖² = Σ_j σ_j ‖X_:j‖² and every term is
// column-separable.
struct Rotated {
  MatrixD g;               // m×r: G·V
  MatrixD x_bar;           // m×r: B̄·V
  Eigen::VectorXd sigma;   // r eigenvalues of S (clamped at 0)
  double target_norm = 0;  // ‖ΔW*‖ > 0
  double lambda = 0;

  struct Point {
    double f = 0;
    double alpha = 0;  // u/(N·v^{3/2}): the cos term's curvature scale (0 where v = 0)
  };

  // f(x), and ∇f(x) into `grad`.
  Point Evaluate(const MatrixD& x, MatrixD* grad) const {
    Point pt;
    pt.f = 1.0 + lambda * (x - x_bar).squaredNorm();
    grad->noalias() = 2.0 * lambda * (x - x_bar);
    const double u = (x.array() * g.array()).sum();
    const double v = (x.array().square().colwise().sum().transpose() * sigma.array()).sum();
    if (v <= 0)
      return pt;  // x·Ā = 0: cos taken as 0 (never a minimiser: any step along G beats it)
    const double sq = std::sqrt(v);
    pt.f -= u / (target_norm * sq);
    // ∇cos = G/(N√v) − u/(N v^{3/2}) · X·diag(σ)
    pt.alpha = u / (target_norm * v * sq);
    grad->noalias() -= g / (target_norm * sq);
    grad->noalias() += x * (pt.alpha * sigma).asDiagonal();
    return pt;
  }
};

}  // namespace

double LoraFairObjective(const LoraFairProblem& p, double lambda, const MatrixD& b,
                         MatrixD* gradient) {
  const MatrixD d = b - p.b_bar;
  double f = 1.0 + lambda * d.squaredNorm();
  if (gradient) *gradient = 2.0 * lambda * d;
  const double n = std::sqrt(std::max(0.0, p.target_norm_sq));
  if (n <= 0) return f;
  const MatrixD bs = b * p.s;  // m×r
  const double u = FrobeniusDot(b, p.g);
  const double v = FrobeniusDot(bs, b);
  if (v <= 0) return f;
  const double sq = std::sqrt(v);
  f -= u / (n * sq);
  if (gradient) *gradient -= p.g / (n * sq) - (u / (n * v * sq)) * bs;
  return f;
}

LoraFairSolution SolveLoraFair(const LoraFairProblem& p, const LoraFairOptions& options) {
  LoraFairSolution sol;
  MatrixD grad;
  auto finish = [&](MatrixD b, int iterations, bool converged) {
    sol.b = std::move(b);
    sol.iterations = iterations;
    sol.objective = LoraFairObjective(p, options.lambda, sol.b, &grad);
    sol.gradient_norm = grad.norm();
    sol.converged = converged;
    return sol;
  };
  sol.fedit_objective = LoraFairObjective(p, options.lambda, p.b_bar, nullptr);
  // Degenerate cases. ΔW* = 0 or Ā = 0: cos is 0 for every B', so ΔB = 0 is the exact optimum. B̄·Ā
  // = 0 (B̄ = 0, say): in S's eigenbasis the columns of B̄ that cos sees are all 0, and there the
  // objective approaches its infimum only as those columns shrink to 0 (cos is scale-free, the
  // penalty is not): no minimiser exists, so FedIT's B̄ is kept and the solution is reported as not
  // converged.
  if (p.target_norm_sq <= 0 || p.s.diagonal().maxCoeff() <= 0) return finish(p.b_bar, 0, true);
  if ((p.b_bar * p.s).cwiseProduct(p.b_bar).sum() <= 0) return finish(p.b_bar, 0, false);

  const SymmetricEigen eig = EigenSymmetric(p.s);
  const Eigen::MatrixXd& v = eig.vectors;  // r×r, orthogonal
  Rotated rot;
  rot.g = p.g * v;
  rot.x_bar = p.b_bar * v;
  rot.sigma = eig.values.cwiseMax(0.0);
  rot.target_norm = std::sqrt(p.target_norm_sq);
  rot.lambda = options.lambda;

  MatrixD x = rot.x_bar, new_grad, x_new;
  grad.resize(x.rows(), x.cols());
  new_grad.resize(x.rows(), x.cols());
  Rotated::Point pt = rot.Evaluate(x, &grad);
  // Stationarity is measured scale-free: ‖∇f‖ times the size of B' (f is dimensionless, ∇f has
  // units 1/B).
  auto stationary = [&](const MatrixD& g, const MatrixD& at) {
    return g.norm() * std::max(at.norm(), rot.x_bar.norm()) <= options.tolerance;
  };

  // L-BFGS with a per-column diagonal initial inverse Hessian 1/(α σ_j + 2λ), backtracking Armijo
  // line search. Every m×r buffer is allocated once; curvature pairs recycle the storage of the
  // ones they replace.
  const size_t memory = static_cast<size_t>(std::min<Eigen::Index>(x.cols() + 6, 40));
  std::deque<std::pair<MatrixD, MatrixD>> pairs;  // (s, y), oldest first
  std::vector<double> a(memory);
  MatrixD dir(x.rows(), x.cols()), step(x.rows(), x.cols()), y(x.rows(), x.cols());
  x_new.resize(x.rows(), x.cols());
  int it = 0;
  for (; it < options.max_iterations; ++it) {
    if (stationary(grad, x)) break;
    // Two-loop recursion: dir = −H·grad.
    dir = grad;
    for (size_t i = pairs.size(); i-- > 0;) {
      const auto& [s, y_i] = pairs[i];
      a[i] = FrobeniusDot(s, dir) / FrobeniusDot(y_i, s);
      dir.noalias() -= a[i] * y_i;
    }
    Eigen::VectorXd h0 = (pt.alpha * rot.sigma.array() + 2.0 * rot.lambda).inverse().matrix();
    if (!pairs.empty()) {
      // Rescale the diagonal so it matches the most recent curvature pair along its direction.
      const auto& [s, y_last] = pairs.back();
      const double yhy = (y_last * h0.asDiagonal()).cwiseProduct(y_last).sum();
      if (yhy > 0) h0 *= FrobeniusDot(s, y_last) / yhy;
    }
    if (!h0.allFinite() || h0.maxCoeff() <= 0) h0.setConstant(rot.x_bar.norm() / grad.norm());
    dir = dir * h0.asDiagonal();
    for (size_t i = 0; i < pairs.size(); ++i) {
      const auto& [s, y_i] = pairs[i];
      const double b = FrobeniusDot(y_i, dir) / FrobeniusDot(y_i, s);
      dir.noalias() += (a[i] - b) * s;
    }
    dir *= -1.0;
    double slope = FrobeniusDot(grad, dir);
    if (!(slope < 0)) {  // Not a descent direction (or NaN): restart from steepest descent.
      pairs.clear();
      dir = grad * (-rot.x_bar.norm() / grad.norm());
      slope = FrobeniusDot(grad, dir);
    }
    double t = 1.0;
    Rotated::Point next;
    bool accepted = false;
    for (int ls = 0; ls < 60; ++ls, t *= 0.5) {
      x_new.noalias() = x + t * dir;
      next = rot.Evaluate(x_new, &new_grad);
      // Armijo; or, once f changes by less than its rounding error (~1e-15 here), a step that
      // lowers the gradient.
      const bool within_noise = std::abs(next.f - pt.f) <= 1e-14 * std::max(1.0, std::abs(pt.f));
      if (next.f <= pt.f + 1e-4 * t * slope || (within_noise && new_grad.norm() < grad.norm())) {
        accepted = true;
        break;
      }
    }
    if (!accepted) break;  // Nothing left to gain at double precision.
    step.noalias() = x_new - x;
    y.noalias() = new_grad - grad;
    if (FrobeniusDot(step, y) > 1e-12 * step.norm() * y.norm()) {
      std::pair<MatrixD, MatrixD> slot;
      if (pairs.size() == memory) {
        slot = std::move(pairs.front());
        pairs.pop_front();
      } else {
        slot = {MatrixD(x.rows(), x.cols()), MatrixD(x.rows(), x.cols())};
      }
      slot.first.swap(step);
      slot.second.swap(y);
      pairs.push_back(std::move(slot));
    }
    x.swap(x_new);
    grad.swap(new_grad);
    pt = next;
  }
  // B' = B̄ + ΔB with ΔB rotated back, so an unmoved solver returns B̄ exactly.
  return finish(p.b_bar + (x - rot.x_bar) * v.transpose(), it, stationary(grad, x));
}

MatrixD ProjectedProduct(const Adapter& adapter, size_t i, const MatrixD& a_bar) {
  return adapter.module(i).scaling * adapter.B(i).cast<double>() *
         (adapter.A(i).cast<double>() * a_bar.transpose());
}

LoraFairSolution SolveLoraFairInRowSpace(MatrixD g, const MatrixD& a_bar, MatrixD b_bar,
                                         const LoraFairOptions& options) {
  LoraFairProblem problem;
  problem.s = a_bar * a_bar.transpose();
  const SymmetricEigen eig = EigenSymmetric(problem.s);
  const Eigen::VectorXd& l = eig.values;
  const double floor = static_cast<double>(l.size()) * 1e-12 * std::max(l.maxCoeff(), 0.0);
  const MatrixD gv = g * eig.vectors;
  for (Eigen::Index k = 0; k < l.size(); ++k)
    if (l(k) > floor) problem.target_norm_sq += gv.col(k).squaredNorm() / l(k);
  problem.g = std::move(g);
  problem.b_bar = std::move(b_bar);
  return SolveLoraFair(problem, options);
}

}  // namespace fedlora::common
