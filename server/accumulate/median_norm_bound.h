// --max-update-norm-ratio K: at the close, an accepted update whose norm ‖s·B·A‖_F exceeds K times
// the lower median of the round's accepted norms is left out of the aggregate (and reported as
// rejected, with its norm); the rest go to the accumulator it wraps. The lower median: with two
// updates the smaller one's norm, so that one of two cannot set its own bound. The bound follows
// the updates' scale, which drifts over a run.
#ifndef FEDLORA_SERVER_ACCUMULATE_MEDIAN_NORM_BOUND_H_
#define FEDLORA_SERVER_ACCUMULATE_MEDIAN_NORM_BOUND_H_

#include <memory>

#include "server/accumulate/accumulator.h"

namespace fedlora::server {

class MedianNormBound final : public Accumulator {
 public:
  MedianNormBound(double ratio, std::unique_ptr<Accumulator> inner)
      : ratio_(ratio), inner_(std::move(inner)) {}

  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override;

 private:
  double ratio_;
  std::unique_ptr<Accumulator> inner_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ACCUMULATE_MEDIAN_NORM_BOUND_H_
