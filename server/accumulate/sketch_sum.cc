#include "server/accumulate/sketch_sum.h"

#include "common/base/status_macros.h"

namespace fedlora::server {

std::vector<common::MatrixD> ZeroSums(const std::vector<common::MatrixShape>& shapes) {
  std::vector<common::MatrixD> sums;
  for (const common::MatrixShape& s : shapes) sums.push_back(common::MatrixD::Zero(s.rows, s.cols));
  return sums;
}

absl::StatusOr<RoundOutput> SketchSum::Aggregate(const std::vector<AcceptedUpdate>& updates,
                                                 const UpdateSource& source) {
  RoundOutput out;
  out.sums = ZeroSums(shapes_);
  RETURN_IF_ERROR(FoldProducts(
      updates, source, [&](const AcceptedUpdate& u, std::vector<common::MatrixD>& products) {
        for (size_t i = 0; i < products.size(); ++i)
          out.sums[i] += static_cast<double>(u.weight) * products[i];
        out.weight += static_cast<double>(u.weight);
        return absl::OkStatus();
      }));
  out.aggregated = ClientsOf(updates);
  return out;
}

}  // namespace fedlora::server
