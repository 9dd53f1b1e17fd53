#include "server/accumulate/secure_sum.h"

#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/privacy/client_dp.h"
#include "server/accumulate/client_dp.h"
#include "server/round/secure_round.h"

namespace fedlora::server {

SecureSum::SecureSum(const SecureRound* round, common::Adapter start, double divisor,
                     std::optional<Privacy> privacy)
    : round_(round), start_(std::move(start)), divisor_(divisor), privacy_(std::move(privacy)) {}

SecureSum::SecureSum(const SecureRound* round, std::vector<common::MatrixShape> sketch,
                     double divisor, std::optional<Privacy> privacy)
    : round_(round), sketch_(std::move(sketch)), divisor_(divisor), privacy_(std::move(privacy)) {}

absl::StatusOr<RoundOutput> SecureSum::Aggregate(const std::vector<AcceptedUpdate>& updates,
                                                 const UpdateSource&) {
  const std::vector<double>& sum = round_->sum();
  const size_t length =
      sketch_ ? static_cast<size_t>(round_->config().length()) : common::TrainableCount(start_);
  if (sum.size() != length)
    return absl::InternalError(
        common::StrCat("the secure sum holds ", sum.size(), " values; the round expects ", length));
  double weights = 0;  // of the survivors: their masked inputs are the accepted updates
  for (const AcceptedUpdate& u : updates) weights += static_cast<double>(u.weight);
  const double divisor = divisor_ > 0 ? divisor_ : weights / round_->config().weight_cap();
  if (!(divisor > 0))
    return absl::FailedPreconditionError(
        common::StrCat("the secure sum's weights add up to ", divisor, "; nothing to average"));
  RoundOutput out;
  out.aggregated = round_->survivors();
  const v1::SecAggConfig& c = round_->config();
  common::SecAggRecord& r = out.secure_aggregation.emplace();
  r.clients = c.cohort_size();
  r.neighbours = c.neighbours();
  r.threshold = c.threshold();
  r.bits = c.bits();
  r.values = c.length();
  r.clip = c.change_clip();
  r.scale = c.scale();
  if (c.noise_num() > 0)
    r.noise_stddev = std::sqrt(static_cast<double>(c.noise_num()) / c.noise_den()) / c.scale();
  if (privacy_) {  // the noise of the survivors actually summed: fewer, less noise, more ε
    common::ClientDpState state = privacy_->state;
    const common::PrivacyRound entry = ClientDp::SecureEntry(
        privacy_->round, privacy_->q, c, static_cast<int>(out.aggregated.size()));
    ASSIGN_OR_RETURN(out.client_dp, privacy_->dp->Spend(entry, divisor, c.change_clip(), state));
    out.dp_state = std::move(state);
  }
  size_t k = 0;
  if (sketch_) {
    for (const common::MatrixShape& m : *sketch_) {
      common::MatrixD& s = out.sums.emplace_back(m.rows, m.cols);
      for (Eigen::Index i = 0; i < s.size(); ++i) s.data()[i] = sum[k++];
    }
    out.weight = divisor;
    return out;
  }
  out.adapter = start_;
  for (std::span<float> values : common::TrainableValues(out.adapter))
    for (float& x : values) x = static_cast<float>(x + sum[k++] / divisor);
  for (size_t i = 0; i < out.adapter.num_modules(); ++i) out.adapter.set_scaling(i, 1.0);
  return out;
}

}  // namespace fedlora::server
