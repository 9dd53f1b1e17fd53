// A step of Fed-SB's initialisation (server/fed_sb_init.h): the weighted sum Σ w_k·X_k of the
// cohort's answers (one product of each client's gradient per module) and Σ w_k, folded in client
// order. Under client-level DP the step is ClientDp's instead (accumulate/client_dp.h).
#ifndef FEDLORA_SERVER_ACCUMULATE_SKETCH_SUM_H_
#define FEDLORA_SERVER_ACCUMULATE_SKETCH_SUM_H_

#include "common/tensor/blob.h"
#include "server/accumulate/accumulator.h"

namespace fedlora::server {

class SketchSum final : public Accumulator {
 public:
  explicit SketchSum(std::vector<common::MatrixShape> shapes) : shapes_(std::move(shapes)) {}

  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override;

 private:
  std::vector<common::MatrixShape> shapes_;
};

// Zero matrices of `shapes`.
std::vector<common::MatrixD> ZeroSums(const std::vector<common::MatrixShape>& shapes);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ACCUMULATE_SKETCH_SUM_H_
