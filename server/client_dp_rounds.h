// Client-level DP on the coordinator (DP-FedAvg; common/privacy/client_dp.h has the math), round
// by round: whether the budget allows a round, the clipped sum as updates arrive, and the round's
// private result with its privacy figures. Finish does not end the round: a round whose commit
// fails is finished again (with fresh noise; nothing of the failed attempt was released), and
// Reset follows the commit.
#ifndef FEDLORA_SERVER_CLIENT_DP_ROUNDS_H_
#define FEDLORA_SERVER_CLIENT_DP_ROUNDS_H_

#include <nlohmann/json.hpp>
#include <optional>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "common/privacy/client_dp.h"
#include "common/privacy/dp.h"
#include "server/ledger.h"
#include "server/server_options.h"

namespace fedlora::server {

class ClientDpRounds {
 public:
  // Noise from OpenSSL's RAND_bytes. `options` must outlive this object.
  static absl::StatusOr<ClientDpRounds> Create(const ServerOptions& options);

  // Starts round `round` from `start` (the global state, scaling 1) with q = cohort / population.
  // False when the round would take ε past the target: the run ends there.
  absl::StatusOr<bool> Start(const ClientDpState& state, int64_t round, size_t cohort,
                             size_t population, common::Adapter start);
  // Clips the update's change and adds it to the round's sum.
  absl::Status Add(const common::Adapter& update);
  // The private result: start + (Σ clipped + noise) / cohort, with LoRA-FAIR's private correction
  // from `updates` (lora-fair only). Puts the round's entry and the next clip into `state` and the
  // round's figures into `metrics`.
  absl::StatusOr<common::AggregateResult> Finish(std::span<const common::Adapter> updates,
                                                 ClientDpState* state, nlohmann::json* metrics);
  // After the round's commit (or when it is abandoned).
  void Reset() { round_.reset(); }

  // Fed-SB's initialisation (server/fed_sb_init.h), step by step: each step is one Gaussian
  // mechanism at q = cohort / population, entered in the history as round 0. StartSketchStep is
  // false when the step would take ε past the target (the run cannot be initialised within it).
  // Each client's answer, flat over the modules, is scaled to norm 1 as it arrives
  // (AddSketchAnswer), so one client moves the step's sum by at most 1 whatever its gradient's
  // scale; NoiseSketchStep adds N(0, z²) to every entry and divides by the cohort (the expected
  // count), enters the step in `state` and puts its figures into `metrics`. The step releases only
  // what is computed from the noisy sum: the next basis, or B, A and R0.
  absl::StatusOr<bool> StartSketchStep(const ClientDpState& state, int step, size_t cohort,
                                       size_t population);
  static void AddSketchAnswer(const std::vector<common::MatrixD>& products,
                              std::vector<common::MatrixD>& sums);
  absl::StatusOr<std::vector<common::MatrixD>> NoiseSketchStep(std::vector<common::MatrixD> sums,
                                                               size_t cohort, ClientDpState* state,
                                                               nlohmann::json* metrics);
  double sample_rate() const { return sample_rate_; }

 private:
  explicit ClientDpRounds(const ServerOptions& options, common::GaussianNoise noise)
      : options_(&options), noise_(std::move(noise)) {}
  // This round in the privacy history; LoRA-FAIR's correction is a second Gaussian mechanism.
  common::PrivacyRound Entry() const;
  common::PrivacyRound SketchEntry() const {
    return {0, sample_rate_, options_->init_noise_multiplier(), 1};
  }
  // Enters `entry` in `state` and returns the figures every metrics line has: ε at δ, order, q,
  // the expected clients, noise multiplier and clip.
  absl::StatusOr<nlohmann::json> Spend(const common::PrivacyRound& entry, double expected,
                                       double clip, ClientDpState* state) const;
  // False, logging that `what` would take ε past the target and what `then` happens.
  absl::StatusOr<bool> WithinTarget(const ClientDpState& state, const common::PrivacyRound& entry,
                                    std::string_view what, std::string_view then) const;
  absl::StatusOr<common::AdaptiveClipper> ClipperFor(double clip, double expected) const;

  const ServerOptions* options_;
  common::GaussianNoise noise_;
  std::optional<common::ClientDpRound> round_;
  int64_t round_number_ = 0;
  double sample_rate_ = 0;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_CLIENT_DP_ROUNDS_H_
