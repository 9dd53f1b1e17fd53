#include "server/accumulate/weighted_mean.h"

#include "common/base/status_macros.h"

namespace fedlora::server {

absl::StatusOr<RoundOutput> WeightedMean::Aggregate(const std::vector<AcceptedUpdate>& updates,
                                                    const UpdateSource& source) {
  common::StreamingAverage sums(method_, shapes_, frozen_);
  RETURN_IF_ERROR(
      FoldUpdates(updates, source, [&](const AcceptedUpdate& u, common::Adapter& update) {
        sums.Add(update, static_cast<double>(u.weight));
        return absl::OkStatus();
      }));
  RoundOutput out;
  ASSIGN_OR_RETURN(out.adapter, sums.Mean());
  out.aggregated = ClientsOf(updates);
  return out;
}

}  // namespace fedlora::server
