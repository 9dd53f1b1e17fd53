#include "common/lora_fair.h"

#include <cmath>
#include <deque>

#include <Eigen/Eigenvalues>

namespace fedlora::common {
namespace {

// The problem in the eigenbasis of S: X = B'·V, so ‖B'Ā‖² = Σ_j σ_j ‖X_:j‖² and every term is column-separable.
struct Rotated {
  MatrixD g;              // m×r: G·V
  MatrixD x_bar;          // m×r: B̄·V
  Eigen::VectorXd sigma;  // r eigenvalues of S (clamped at 0)
  double target_norm = 0; // ‖ΔW*‖
  double lambda = 0;

  // f(x), and ∇f(x) into `grad`; `alpha` gets the cos term's curvature scale u/(N·v^{3/2}) (0 when undefined).
  double Evaluate(const MatrixD& x, MatrixD* grad, double* alpha) const {
    const MatrixD d = x - x_bar;
    double f = 1.0 + lambda * d.squaredNorm();
    grad->noalias() = 2.0 * lambda * d;
    *alpha = 0;
    if (target_norm <= 0) return f;  // ΔW* = 0: cos ≡ 0, only the penalty remains.
    const double u = (x.array() * g.array()).sum();
    const double v = (x.array().square().colwise().sum().transpose() * sigma.array()).sum();
    if (v <= 0) {
      // x·Ā = 0: cos is 0 here and rises along G; use that direction so the solver can leave the point.
      grad->noalias() -= g / (target_norm * target_norm);
      return f;
    }
    const double sq = std::sqrt(v);
    f -= u / (target_norm * sq);
    // ∇cos = G/(N√v) − u/(N v^{3/2}) · X·diag(σ)
    *alpha = u / (target_norm * v * sq);
    grad->noalias() -= g / (target_norm * sq);
    grad->noalias() += x * (*alpha * sigma).asDiagonal();
    return f;
  }
};

double Dot(const MatrixD& a, const MatrixD& b) { return (a.array() * b.array()).sum(); }

}  // namespace

double LoraFairObjective(const LoraFairProblem& p, const MatrixD& b, MatrixD* gradient) {
  const MatrixD d = b - p.b_bar;
  double f = 1.0 + p.lambda * d.squaredNorm();
  if (gradient) *gradient = 2.0 * p.lambda * d;
  const double n = std::sqrt(std::max(0.0, p.target_norm_sq));
  if (n <= 0) return f;
  const MatrixD bs = b * p.s;  // m×r
  const double u = Dot(b, p.g);
  const double v = Dot(bs, b);
  if (v <= 0) {
    if (gradient) *gradient -= p.g / (n * n);
    return f;
  }
  const double sq = std::sqrt(v);
  f -= u / (n * sq);
  if (gradient) *gradient -= p.g / (n * sq) - (u / (n * v * sq)) * bs;
  return f;
}

LoraFairSolution SolveLoraFair(const LoraFairProblem& p, const LoraFairOptions& options) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(Eigen::MatrixXd(p.s));
  const Eigen::MatrixXd v = eig.eigenvectors();  // r×r, orthogonal
  Rotated rot;
  rot.g = p.g * v;
  rot.x_bar = p.b_bar * v;
  rot.sigma = eig.eigenvalues().cwiseMax(0.0);
  rot.target_norm = std::sqrt(std::max(0.0, p.target_norm_sq));
  rot.lambda = options.lambda;

  const double scale = std::max(p.b_bar.norm(), 1e-12);
  MatrixD x = rot.x_bar, grad(x.rows(), x.cols()), new_grad(x.rows(), x.cols()), x_new;
  double alpha = 0;
  double f = rot.Evaluate(x, &grad, &alpha);
  LoraFairSolution sol;
  sol.fedit_objective = f;

  // L-BFGS with a per-column diagonal initial inverse Hessian 1/(α σ_j + 2λ), backtracking Armijo line search.
  const int memory = static_cast<int>(std::min<Eigen::Index>(x.cols() + 6, 40));
  std::deque<std::pair<MatrixD, MatrixD>> pairs;  // (s, y)
  int it = 0;
  for (; it < options.max_iterations; ++it) {
    if (grad.norm() * scale <= options.tolerance) break;
    // Two-loop recursion.
    MatrixD q = grad;
    std::vector<double> a(pairs.size());
    for (int i = static_cast<int>(pairs.size()) - 1; i >= 0; --i) {
      const auto& [s, y] = pairs[i];
      a[i] = Dot(s, q) / Dot(y, s);
      q -= a[i] * y;
    }
    Eigen::VectorXd h0 = (alpha * rot.sigma.array() + 2.0 * options.lambda).inverse().matrix();
    if (!pairs.empty()) {
      // Rescale the diagonal so it matches the most recent curvature pair along its direction.
      const auto& [s, y] = pairs.back();
      const double yhy = Dot(y, y * h0.asDiagonal());
      if (yhy > 0) h0 *= Dot(s, y) / yhy;
    } else if (!h0.allFinite() || h0.maxCoeff() <= 0) {
      h0.setConstant(1.0 / std::max(grad.norm(), 1e-300));
    }
    MatrixD dir = q * h0.asDiagonal();
    for (size_t i = 0; i < pairs.size(); ++i) {
      const auto& [s, y] = pairs[i];
      const double b = Dot(y, dir) / Dot(y, s);
      dir += (a[i] - b) * s;
    }
    dir = -dir;
    double slope = Dot(grad, dir);
    if (!(slope < 0)) {  // Not a descent direction (or NaN): restart from steepest descent.
      pairs.clear();
      dir = -grad / std::max(grad.norm(), 1e-300) * scale;
      slope = Dot(grad, dir);
    }
    double t = 1.0, f_new = f, new_alpha = 0;
    bool accepted = false;
    for (int ls = 0; ls < 60; ++ls, t *= 0.5) {
      x_new = x + t * dir;
      f_new = rot.Evaluate(x_new, &new_grad, &new_alpha);
      if (f_new <= f + 1e-4 * t * slope) {
        accepted = true;
        break;
      }
    }
    if (!accepted || f_new >= f) break;  // No decrease left at double precision.
    MatrixD step = x_new - x;
    MatrixD y = new_grad - grad;
    if (Dot(step, y) > 1e-12 * step.norm() * y.norm()) {
      pairs.emplace_back(std::move(step), std::move(y));
      if (static_cast<int>(pairs.size()) > memory) pairs.pop_front();
    }
    x.swap(x_new);
    grad.swap(new_grad);
    f = f_new;
    alpha = new_alpha;
  }
  sol.iterations = it;
  sol.b = x * v.transpose();
  sol.objective = LoraFairObjective(p, sol.b, &grad);
  sol.gradient_norm = grad.norm();
  sol.converged = sol.gradient_norm * scale <= options.tolerance || rot.target_norm <= 0;
  return sol;
}

}  // namespace fedlora::common
