// LoRA-FAIR's server-side correction of FedIT's B̄ (Bian et al., ICCV 2025), solved in low-rank
// form.
// clang-format off
//
//   ΔB* = argmin_ΔB  [1 − cos(ΔW*, (B̄ + ΔB)·Ā)] + λ·‖ΔB‖_F²      (cos over the flattened m×n matrices)
//
// With B' = B̄ + ΔB the objective needs only G = Σ_k p_k B_k (A_k Āᵀ) (m×r), S = Ā Āᵀ (r×r) and ‖ΔW*‖²:
//   ⟨ΔW*, B'Ā⟩ = ⟨B', G⟩_F,   ‖B'Ā‖² = ⟨B'S, B'⟩_F                       (ALGORITHMS.md, "LoRA-FAIR")
// clang-format on
// so no m×n matrix is ever formed. In the eigenbasis of S (S = V·diag(σ)·Vᵀ, X = B'·V) one
// evaluation of the objective and its gradient costs O(m·r); the solver is L-BFGS there,
// preconditioned per column by the curvature α·σ_j + 2λ of the stationarity condition B' = (β·G +
// 2λ·B̄)(α·S + 2λ·I)⁻¹.
#ifndef FEDLORA_COMMON_AGGREGATION_LORA_FAIR_H_
#define FEDLORA_COMMON_AGGREGATION_LORA_FAIR_H_

#include "common/tensor/adapter.h"
#include "common/tensor/eigen_types.h"

namespace fedlora::common {

struct LoraFairOptions {
  double lambda = 0.01;  // λ, the weight of ‖ΔB‖²; the paper's ablation shows λ = 0 hurts.
  double tolerance = 1e-8;  // Stop when ‖∇f‖_F · max(‖B'‖_F, ‖B̄‖_F) falls below this (scale-free).
  int max_iterations = 1000;  // L-BFGS iterations at most.
};

// One module's problem; client scalings are folded into every B_k.
struct LoraFairProblem {
  MatrixD g;                  // m×r: Σ_k p_k B_k (A_k Āᵀ)
  MatrixD s;                  // r×r: Ā Āᵀ
  MatrixD b_bar;              // m×r: FedIT's B̄ = Σ_k p_k B_k
  double target_norm_sq = 0;  // ‖ΔW*‖_F² with ΔW* = Σ_k p_k B_k A_k
};

struct LoraFairSolution {
  MatrixD b;                   // m×r: B̄ + ΔB*
  double objective = 0;        // f at b
  double fedit_objective = 0;  // f at B̄ (ΔB = 0): what FedIT's aggregate scores
  double gradient_norm = 0;    // ‖∇f(b)‖_F
  int iterations = 0;
  // The tolerance was met, or ΔW* = 0 or Ā = 0 (then ΔB = 0 is exact). False when B̄·Ā = 0 but ΔW* ≠
  // 0: there is no minimiser (the infimum is approached only as B'·Ā → 0) and B̄ is returned.
  bool converged = false;
};

// f(b) = 1 − cos(ΔW*, b·Ā) + λ‖b − B̄‖²; writes ∇f(b) (m×r) when `gradient` is not null. cos is
// taken as 0 (and left out of the gradient) when ΔW* = 0 or b·Ā = 0, as a zero matrix has no
// direction.
double LoraFairObjective(const LoraFairProblem& problem, double lambda, const MatrixD& b,
                         MatrixD* gradient);

LoraFairSolution SolveLoraFair(const LoraFairProblem& problem, const LoraFairOptions& options);

// s·B·(A·Āᵀ) for `adapter`'s module i (m×r; s·B·R·A for LoRA-SB is not asked): one client's term
// of G, or the round start's.
MatrixD ProjectedProduct(const Adapter& adapter, size_t i, const MatrixD& a_bar);

// The correction when only G = ΔW*·Āᵀ is known — a sum over clients (a private or secure one),
// where ‖ΔW*‖² is not: it is replaced by the norm of ΔW*'s part in Ā's row space,
// ‖G (ĀĀᵀ)^{+½}‖_F² (eigenvalues of ĀĀᵀ below r·1e-12·its largest count as 0), which is all B'·Ā
// can express and keeps the cosine ≤ 1. It equals ‖ΔW*‖² when every client's A_k lies in Ā's row
// space; otherwise it is smaller, and λ weighs a little less against the cosine.
LoraFairSolution SolveLoraFairInRowSpace(MatrixD g, const MatrixD& a_bar, MatrixD b_bar,
                                         const LoraFairOptions& options);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_AGGREGATION_LORA_FAIR_H_
