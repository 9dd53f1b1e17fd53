// FLoRA's stacking and LoRA-FAIR's corrected average (ALGORITHMS.md; common::Aggregate): methods
// that need every client's factors at once, so the round's updates are decoded together at the
// close, in client order.
#ifndef FEDLORA_SERVER_ACCUMULATE_EVERY_FACTOR_H_
#define FEDLORA_SERVER_ACCUMULATE_EVERY_FACTOR_H_

#include "common/aggregation/aggregate.h"
#include "server/accumulate/accumulator.h"

namespace fedlora::server {

class EveryFactor final : public Accumulator {
 public:
  explicit EveryFactor(common::AggregateOptions options) : options_(std::move(options)) {}

  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override;

 private:
  common::AggregateOptions options_;
};

// The mean over modules of LoRA-FAIR's objective reached, and of FedIT's (ΔB = 0), into `out`.
void SetLoraFairObjectives(const std::vector<common::ModuleReport>& modules, RoundOutput& out);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ACCUMULATE_EVERY_FACTOR_H_
