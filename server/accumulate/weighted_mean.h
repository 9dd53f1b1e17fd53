// FedIT's Ā = Σ w_k A_k / Σ w_k, B̄ = Σ w_k s_k B_k / Σ w_k, and Fed-SB's R̄ on the frozen B, A
// (ALGORITHMS.md), w_k the aggregation weights: the updates folded in client order into double
// sums (common::StreamingAverage), one window of them in memory at a time.
#ifndef FEDLORA_SERVER_ACCUMULATE_WEIGHTED_MEAN_H_
#define FEDLORA_SERVER_ACCUMULATE_WEIGHTED_MEAN_H_

#include "common/aggregation/aggregate.h"
#include "server/accumulate/accumulator.h"

namespace fedlora::server {

class WeightedMean final : public Accumulator {
 public:
  // `shapes`: the output's modules at the run's rank; `frozen` (fed-sb): the shared B and A.
  WeightedMean(common::Method method, std::vector<common::ModuleShape> shapes,
               const common::Adapter* frozen)
      : method_(method), shapes_(std::move(shapes)), frozen_(frozen) {}

  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override;

 private:
  common::Method method_;
  std::vector<common::ModuleShape> shapes_;
  const common::Adapter* frozen_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ACCUMULATE_WEIGHTED_MEAN_H_
