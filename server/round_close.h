// The close of a round, as one transaction: compute the round's result from its accepted updates,
// write the new version's blob, then save the ledger with the new version — that save is the single
// point at which the round becomes done. Nothing before it changes the ledger or the round's
// uploads, so a failure leaves the previous state and the accepted updates intact and the close can
// be retried; nothing after it (server/round_engine.h: evaluation, the metrics line, exports) can
// create a second version. The version carries the round's record (its metrics line), from which
// what follows the commit is derived.
#ifndef FEDLORA_SERVER_ROUND_CLOSE_H_
#define FEDLORA_SERVER_ROUND_CLOSE_H_

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "server/client_dp_rounds.h"
#include "server/server_options.h"
#include "server/state_store.h"
#include "server/uploads.h"

namespace fedlora::server {

// What the engine knows of a round when it closes.
struct RoundFacts {
  int64_t round = 0;
  int attempt = 0;  // 0 for the first
  std::vector<std::string> cohort;
  std::vector<std::string> rejected;
  std::map<std::string, std::string> declined;  // client → reason
  std::map<std::string, int64_t> late;          // client → the round its late update was for
  std::map<std::string, int64_t> bytes_down;    // cohort member → bytes downloaded this round
  double elapsed_seconds = 0;                   // since the first round of this process started
};

// The pieces a close works with; `sums` (fedit, fed-sb) already holds the accepted updates unless
// they were held (HoldsUpdates), and `dp` is set in runs with client-level DP.
struct RoundInputs {
  const ServerOptions* options;
  StateStore* store;
  Uploads* uploads;
  const common::StreamingAverage* sums;
  ClientDpRounds* dp;
};

// Whether a round's accepted updates are held, decoded, until its close instead of summed as they
// arrive: flora and lora-fair need every client's factors, the median norm bound every norm.
inline bool HoldsUpdates(common::Method method, const ServerOptions& options) {
  return method == common::Method::kFlora || method == common::Method::kLoraFair ||
         options.max_update_norm_ratio > 0;
}

// Aggregates the round's accepted updates and commits the new version (see above); returns the
// committed version's record. The accepted updates stay in `uploads` either way.
absl::StatusOr<nlohmann::json> CloseRound(const RoundFacts& facts, const RoundInputs& in);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_CLOSE_H_
