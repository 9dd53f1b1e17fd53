// Client-level differential privacy on the coordinator: DP-FedAvg (McMahan et al. 2018) as
// ALGORITHMS.md states it. Each client's update Δ_k — its trained parameters minus the round's
// starting point, scalings folded in, flat L2 over all modules — is clipped to S; the round's
// result is
//
//     start + (Σ_k clip_S(Δ_k) + N(0, (z·S)²)) / m
//
// with m the EXPECTED number of clients (the cohort drawn, not the count that arrived), so one
// client's presence changes the sum by at most S. Every client weighs the same: example counts are
// reported by the clients and would make a client's influence unbounded.
//
// What is trained, and therefore clipped and noised: A and B of a LoRA module (FedIT, LoRA-FAIR), R
// of a LoRA-SB module (Fed-SB: noise enters as B·ξ·A, and ‖B ξ A‖_F = ‖ξ‖_F for orthonormal B, A).
// For FedIT the noise goes on the sums of A and of B, and the applied delta B̄·Ā multiplies them:
// its error has cross terms ξ_B·Ā + B̄·ξ_A + ξ_B·ξ_A.
#ifndef FEDLORA_COMMON_PRIVACY_CLIENT_DP_H_
#define FEDLORA_COMMON_PRIVACY_CLIENT_DP_H_

#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/lora_fair.h"
#include "common/privacy/dp.h"
#include "common/tensor/adapter.h"

namespace fedlora::common {

// The trained values of `adapter`: R of LoRA-SB modules, A and B of the others, in module order.
std::vector<std::span<float>> TrainableValues(Adapter& adapter);
// How many values TrainableValues spans.
size_t TrainableCount(const Adapter& adapter);
// Δ = update − start in the layout of TrainableValues(start), scalings folded: s·R − R0, or
// A − A0 then s·B − B0. INVALID_ARGUMENT unless `update` has start's modules (by name) with the
// same shapes; `out` must have TrainableCount(start) values.
absl::Status ChangeInto(const Adapter& update, const Adapter& start, std::span<float> out);

class ClientDpRound {
 public:
  // `start` is the round's global state (scaling 1 in every module); `clip` is S;
  // `expected_clients` is m.
  ClientDpRound(Adapter start, double clip, double expected_clients);

  // Clips Δ_k = update − start to S and adds it to the sum; returns ‖Δ_k‖ before clipping. The
  // update must have the start's modules (by name) with the same shapes (checked).
  absl::StatusOr<double> Add(const Adapter& update);

  // start + (Σ clip(Δ_k) + N(0, (z·S)²))/m, every module at scaling 1. z = 0 gives the clipped mean
  // without noise (for tests; not private).
  Adapter Finish(double noise_multiplier, GaussianNoise& noise) const;

  const Adapter& start() const { return start_; }
  double clip() const { return clip_; }
  double expected_clients() const { return expected_clients_; }
  const std::vector<double>& norms() const { return norms_; }  // per Add, before clipping

 private:
  Adapter start_;
  double clip_;
  double expected_clients_;
  std::vector<double> sum_;   // Σ clip(Δ_k), laid out as TrainableValues(start_)
  std::vector<float> delta_;  // scratch for one Δ_k
  std::vector<double> norms_;
};

// LoRA-FAIR's server correction under client-level DP. `global` holds the private (Ā, B̄) released
// by ClientDpRound; the correction needs G = Σ_k B_k A_k Āᵀ per module, which depends on each
// client's factors, so it is a second Gaussian mechanism of the same round (the accountant counts
// two): per client c_k = (s_k B_k A_k − B_0 A_0)·Āᵀ for every module, clipped flat to
// `clip` · max_i ‖Ā_i‖₂, summed, noised with multiplier z and divided by m, plus B_0 A_0 Āᵀ. ‖ΔW*‖
// is not a sum over clients; it is replaced by the norm of the target's part in Ā's row space, ‖Ĝ
// (ĀĀᵀ)^{+½}‖_F, which is all B'·Ā can express and keeps the cosine ≤ 1. Writes B̄ + ΔB* into
// `global` and returns each module's solution (its `b` cleared).
absl::StatusOr<std::vector<LoraFairSolution>> PrivateLoraFairCorrection(
    std::span<const Adapter> updates, const Adapter& start, Adapter& global, double clip,
    double noise_multiplier, double expected_clients, GaussianNoise& noise,
    const LoraFairOptions& options);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_PRIVACY_CLIENT_DP_H_
