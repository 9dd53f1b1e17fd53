#include "server/accumulate/median_norm_bound.h"

#include <spdlog/spdlog.h>

#include <algorithm>

#include "common/base/status_macros.h"

namespace fedlora::server {

absl::StatusOr<RoundOutput> MedianNormBound::Aggregate(const std::vector<AcceptedUpdate>& updates,
                                                       const UpdateSource& source) {
  // Below three updates the lower median is the smaller one: a tiny update would make an honest
  // one the outlier.
  if (updates.size() < 3) return inner_->Aggregate(updates, source);
  std::vector<double> norms;
  for (const AcceptedUpdate& u : updates) norms.push_back(u.norm);
  const size_t lower = (norms.size() - 1) / 2;
  std::nth_element(norms.begin(), norms.begin() + static_cast<ptrdiff_t>(lower), norms.end());
  const double median = norms[lower];
  if (!(median > 0)) return inner_->Aggregate(updates, source);  // no scale to bound by
  std::vector<AcceptedUpdate> kept;
  common::PerClientValue outliers;
  for (const AcceptedUpdate& u : updates) {
    if (u.norm <= ratio_ * median) {
      kept.push_back(u);
      continue;
    }
    spdlog::warn(
        "left {}'s update out of the aggregate: its norm ‖s·B·A‖_F = {:.6g} exceeds {} × the "
        "round's median norm {:.6g} (--max-update-norm-ratio)",
        u.client, u.norm, ratio_, median);
    outliers[u.client] = u.norm;
  }
  ASSIGN_OR_RETURN(RoundOutput out, inner_->Aggregate(kept, source));
  out.norm_outliers = std::move(outliers);
  return out;
}

}  // namespace fedlora::server
