// The close of a round, as one transaction: accumulator → aggregate → commit. The round's
// accumulator (server/accumulate/) computes its result from the accepted updates; the close writes
// the new version's blob, then saves the ledger with the new version and its record — that save is
// the single point at which the round becomes done. Nothing before it changes the ledger or the
// round's uploads, so a failure leaves the previous state and the accepted updates intact and the
// close can be retried; nothing after it (server/follow_up.h: evaluation, the metrics line,
// exports) can create a second version. A step of Fed-SB's initialisation closes the same way
// into server/fed_sb_init.h's CommitInitStep.
#ifndef FEDLORA_SERVER_ROUND_CLOSE_H_
#define FEDLORA_SERVER_ROUND_CLOSE_H_

#include <cstdint>
#include <map>
#include <string>

#include "absl/status/statusor.h"
#include "common/run/records.h"
#include "server/accumulate/accumulator.h"
#include "server/intake/uploads.h"
#include "server/state_store.h"

namespace fedlora::server {

// What the engine knows of a round when it closes: its participation but for what the close
// decides (arrived, bytes_up, and the outliers it adds to rejected), and its late updates.
struct RoundFacts {
  int64_t round = 0;  // 0: a step of Fed-SB's initialisation
  common::Participation who;
  std::map<std::string, int64_t> late;  // client → the round its late update was for
};

// The record of a round (or step) from its facts, its accumulator's output and its uploads: who
// arrived (the aggregated), who was rejected (the outliers added) or dropped, bytes and losses.
common::RoundRecord RecordOf(const RoundFacts& facts, const RoundOutput& output,
                             const Uploads& uploads, common::Method method);

// Aggregates the round's accepted updates with `accumulator` (reading them through `source`) and
// commits the new version; returns its record. The accepted updates stay in `uploads` either way.
absl::StatusOr<common::RoundRecord> CloseRound(const RoundFacts& facts, Accumulator& accumulator,
                                               const UpdateSource& source, const Uploads& uploads,
                                               StateStore& store);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_CLOSE_H_
