// Rényi-DP accountant for the sampled Gaussian mechanism (Mironov 2017; Mironov, Talwar, Zhang
// 2019), computed as Opacus computes it, with the improved RDP → (ε, δ) conversion of Balle et al.
// 2020:
//   ε(α) = RDP(α) − (ln δ + ln α)/(α − 1) + ln((α − 1)/α),   ε = min over the orders α.
// Integer orders use the binomial expansion of A_α, fractional orders the two-series formula with
// log-erfc terms; everything is in log space. Steps compose additively, and so do heterogeneous
// histories (AddSteps with other q, σ).
#ifndef FEDLORA_COMMON_PRIVACY_PRIVACY_ACCOUNTANT_H_
#define FEDLORA_COMMON_PRIVACY_PRIVACY_ACCOUNTANT_H_

#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

// Opacus' default orders: 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
std::vector<double> DefaultRdpOrders();

// RDP of one step of the sampled Gaussian mechanism with sampling rate q and noise multiplier σ at
// order α > 1. q = 0 → 0; σ = 0 → ∞; q = 1 → α/(2σ²).
double SampledGaussianRdp(double q, double sigma, double alpha);

// RDP at order α > 1 of the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021,
// Proposition 14): the sum of `summands` (n) independent N_Z(0, σ_l²) per coordinate added to a
// `dim`-dimensional integer query of L2 sensitivity Δ₂ and L1 sensitivity Δ₁. With
// τ = 10·Σ_{k=1..n−1} exp(−2π²σ_l²·k/(k+1)) and s = √n·σ_l it is the least of
//   α/2·Δ₂²/s² + τ·d,   α/2·(Δ₂²/s² + 2·Δ₁·τ/s + τ²·d),   α/2·(Δ₂/s + τ·√d)².
double DistributedDiscreteGaussianRdp(double alpha, double l2, double l1, double local_sigma,
                                      int summands, double dim);

struct PrivacySpent {
  double epsilon = 0;
  double order = 0;  // the α that attains the minimum
};

class RdpAccountant {
 public:
  explicit RdpAccountant(std::vector<double> orders = DefaultRdpOrders());

  // Records `steps` steps with sampling rate q and noise multiplier σ. INVALID_ARGUMENT for q ∉ [0,
  // 1], σ < 0, negative steps, or non-finite values.
  absl::Status AddSteps(double q, double sigma, double steps);
  // Adds rdp(α) at every order α (a mechanism of its own, composed).
  void AddRdp(const std::function<double(double)>& rdp);

  // (ε, best order) for δ ∈ (0, 1); ε = ∞ when nothing private was spent (σ = 0 somewhere).
  absl::StatusOr<PrivacySpent> Spent(double delta) const;

  const std::vector<double>& orders() const { return orders_; }
  const std::vector<double>& rdp() const { return rdp_; }  // accumulated RDP per order

 private:
  std::vector<double> orders_;
  std::vector<double> rdp_;
};

// One entry of a privacy history (a client's DP-SGD ledger, the coordinator's client-level DP):
// `steps` compositions of the sampled Gaussian mechanism at sampling rate q and noise multiplier
// sigma, spent in `round`.
// A secure round's distributed discrete Gaussian (DistributedDiscreteGaussianRdp), in the
// integer units the clients quantise to.
struct DistributedGaussian {
  double l2 = 0, l1 = 0;   // sensitivities of one client's contribution
  double local_sigma = 0;  // each client's noise
  int summands = 0;        // the clients whose noise the released sum holds
  double dim = 0;          // values per client
  bool operator==(const DistributedGaussian&) const = default;
};
struct PrivacyRound {
  int64_t round = 0;
  double q = 0;
  double sigma = 0;
  double steps = 0;
  // Set: `steps` releases of this distributed discrete Gaussian instead (q and sigma are then
  // only reported: no amplification by sampling is claimed for it).
  std::optional<DistributedGaussian> ddg;
};
using PrivacyHistory = std::vector<PrivacyRound>;

// As JSON: [{"round", "q", "sigma", "steps"[, "ddg": {"l2", "l1", "local_sigma", "summands",
// "dim"}]}, ...]. Reading an entry without a number q, sigma or
// steps is an INVALID_ARGUMENT that names `origin` and the entry; "round" may be absent (0).
nlohmann::json PrivacyHistoryToJson(const PrivacyHistory& history);
absl::StatusOr<PrivacyHistory> PrivacyHistoryFromJson(const nlohmann::json& json,
                                                      std::string_view origin);

// ε for δ of a history; INVALID_ARGUMENT, naming the entry, when one has a bad value.
absl::StatusOr<PrivacySpent> SpentOver(const PrivacyHistory& history, double delta);

// ε of `steps` steps at (q, σ) for δ.
absl::StatusOr<PrivacySpent> EpsilonFor(double q, double sigma, double steps, double delta);

// The smallest noise multiplier σ whose ε for (q, steps, δ) is at most `target_epsilon`, to a
// relative precision of 1e-6 in σ (bisection; ε decreases monotonically in σ).
absl::StatusOr<double> NoiseMultiplierFor(double target_epsilon, double q, double steps,
                                          double delta);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_PRIVACY_PRIVACY_ACCOUNTANT_H_
