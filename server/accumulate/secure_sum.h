// What a round under secure aggregation commits (server/round/secure_round.h): the decoded sum of
// the survivors' changes, and nothing of any one client. A round: start + Σ_k w_k·Δ_k / Σ_k w_k
// for trained values Δ_k (A and B, or R), w_k = min(examples, cap)/cap from the examples each
// survivor claims, or, under client-level DP, start + (Σ_k Δ_k + the clients' noise) / the cohort
// drawn. A Fed-SB initialisation step likewise: the answers' sum and its divisor (Σ w_k, or the
// cohort under DP, of unit-norm answers).
#ifndef FEDLORA_SERVER_ACCUMULATE_SECURE_SUM_H_
#define FEDLORA_SERVER_ACCUMULATE_SECURE_SUM_H_

#include <optional>
#include <vector>

#include "common/run/ledger.h"
#include "common/tensor/adapter.h"
#include "common/tensor/blob.h"
#include "server/accumulate/accumulator.h"
#include "server/intake/uploads.h"

namespace fedlora::server {

class SecureRound;
class ClientDp;

class SecureSum final : public Accumulator {
 public:
  // Under client-level DP: what the release spends (ClientDp::SecureEntry with the survivors).
  struct Privacy {
    ClientDp* dp = nullptr;
    common::ClientDpState state;  // before the round
    int64_t round = 0;
    double q = 0;
  };
  // `round` outlives this and is done when Aggregate is called; `start` is the round's global
  // state (scaling 1). `divisor` > 0: the fixed divisor (client-level DP); 0: the survivors' Σ w_k
  // (their accepted weights over the instance's weight cap).
  SecureSum(const SecureRound* round, common::Adapter start, double divisor,
            std::optional<Privacy> privacy = std::nullopt);
  SecureSum(const SecureRound* round, std::vector<common::MatrixShape> sketch, double divisor,
            std::optional<Privacy> privacy = std::nullopt);

  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override;

 private:
  const SecureRound* round_;
  common::Adapter start_;
  std::optional<std::vector<common::MatrixShape>> sketch_;
  double divisor_;
  std::optional<Privacy> privacy_;
};

// LoRA-FAIR under secure aggregation: the round's first sum (a SecureSum) gives Ā and B̄; its
// second, over the first's survivors, gives G = B_0 A_0 Āᵀ + Σ_k w_k (s_k B_k A_k − B_0 A_0) Āᵀ /
// Σ_k w_k per module (the w_k and Σ w_k of the second's survivors, or the first's cohort under
// DP). The correction is solved from G in Ā's row space (common::SolveLoraFairInRowSpace: ‖ΔW*‖
// is no sum over clients) and replaces B̄ in the first sum's output. When the second sum did not
// finish, the first's output is the round's, uncorrected: FedIT's aggregate (the round is never
// retrained once its first sum is out: a second sum of the same updates over another cohort
// would reveal their difference).
class SecureCorrection final : public Accumulator {
 public:
  // `round`: the second sum's (null when it could not open); `second`: its accepted masked inputs
  // (whose weights divide G); `first`: the first sum's output; `start`: the round's global state.
  // `privacy` starts from `first`'s privacy state.
  SecureCorrection(const SecureRound* round, const Uploads* second, RoundOutput first,
                   common::Adapter start, double divisor, double lambda,
                   std::optional<SecureSum::Privacy> privacy = std::nullopt);

  // `updates` are the first sum's (what the round records); G's weights are `second`'s.
  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override;

 private:
  const SecureRound* round_;
  const Uploads* second_;
  RoundOutput first_;
  common::Adapter start_;
  double divisor_;
  double lambda_;
  std::optional<SecureSum::Privacy> privacy_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ACCUMULATE_SECURE_SUM_H_
