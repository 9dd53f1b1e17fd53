// Client-level DP on the coordinator (DP-FedAvg; common/privacy/client_dp.h has the math), round
// by round: whether the budget allows a round (or a step of Fed-SB's initialisation), and the
// accumulator that releases its private result with what it spent. Every client weighs the same
// and the divisor is the cohort drawn. Noise comes from OpenSSL's RAND_bytes, so a private run is
// not reproducible, by design; a round whose commit fails is aggregated again with fresh noise
// (nothing of the failed attempt was released).
#ifndef FEDLORA_SERVER_ACCUMULATE_CLIENT_DP_H_
#define FEDLORA_SERVER_ACCUMULATE_CLIENT_DP_H_

#include <memory>
#include <string_view>

#include "absl/status/statusor.h"
#include "common/privacy/client_dp.h"
#include "common/privacy/dp.h"
#include "common/run/ledger.h"
#include "common/tensor/blob.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/accumulate/accumulator.h"
#include "server/server_options.h"

namespace fedlora::server {

class ClientDp {
 public:
  // `options` must outlive this object.
  static absl::StatusOr<std::unique_ptr<ClientDp>> Create(const ServerOptions& options);

  // The accumulator of round `round`, which starts from `start` (the global state, scaling 1),
  // with q = cohort / population; null when the round would take ε past the target (the run ends
  // there). `state` is the ledger's privacy state before the round.
  absl::StatusOr<std::unique_ptr<Accumulator>> OpenRound(const common::ClientDpState& state,
                                                         int64_t round, size_t cohort,
                                                         size_t population, common::Adapter start);
  // The accumulator of a step of Fed-SB's initialisation, whose answers have `shapes`: each
  // client's answer, flat over the modules, scaled to norm 1 (one client moves the sum by at most
  // 1 whatever its gradient's scale), summed, noised with N(0, z²) per entry (z: the init noise
  // multiplier) and divided by the cohort; one Gaussian mechanism entered as round 0. Null when
  // the step would take ε past the target (the run cannot be initialised within it).
  absl::StatusOr<std::unique_ptr<Accumulator>> OpenSketchStep(
      const common::ClientDpState& state, int step, size_t cohort, size_t population,
      std::vector<common::MatrixShape> shapes);

  // Under secure aggregation (distributed DP: each client adds N_Z(0, σ²/cohort) to its quantised
  // change): a round's entry, the distributed discrete Gaussian of `config`'s quantisation with
  // `summands` clients' noise in the released sum, at the sensitivity rounding allows
  // (clip·scale + √d in L2, ALGORITHMS.md; in L1 the lesser of its square and √d times it). `q`
  // is only reported.
  static common::PrivacyRound SecureEntry(int64_t round, double q, const v1::SecAggConfig& config,
                                          int summands);
  // Whether `entry` keeps ε within the target (logging, when not, that `what` ends the run).
  absl::StatusOr<bool> Within(const common::ClientDpState& state, const common::PrivacyRound& entry,
                              std::string_view what) const {
    return WithinTarget(state, entry, what, "no more rounds are run");
  }

  // Enters `entry` in `state` and returns what every release reports: ε at δ, order, q, the
  // expected clients, noise multiplier and clip.
  absl::StatusOr<common::ClientDpSpend> Spend(const common::PrivacyRound& entry, double expected,
                                              double clip, common::ClientDpState& state) const;
  absl::StatusOr<common::AdaptiveClipper> ClipperFor(double clip, double expected) const;
  const ServerOptions& options() const { return *options_; }
  common::GaussianNoise& noise() { return noise_; }

 private:
  ClientDp(const ServerOptions& options, common::GaussianNoise noise)
      : options_(&options), noise_(std::move(noise)) {}
  // False, logging that `what` would take ε past the target and what `then` happens.
  absl::StatusOr<bool> WithinTarget(const common::ClientDpState& state,
                                    const common::PrivacyRound& entry, std::string_view what,
                                    std::string_view then) const;

  const ServerOptions* options_;
  common::GaussianNoise noise_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ACCUMULATE_CLIENT_DP_H_
