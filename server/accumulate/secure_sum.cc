#include "server/accumulate/secure_sum.h"

#include <cmath>

#include "common/aggregation/lora_fair.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/privacy/client_dp.h"
#include "server/accumulate/client_dp.h"
#include "server/accumulate/every_factor.h"
#include "server/round/secure_round.h"

namespace fedlora::server {
namespace {

// The done `round`'s sum, checked to hold `length` values.
absl::StatusOr<const std::vector<double>*> SumOf(const SecureRound& round, size_t length) {
  if (round.sum().size() != length)
    return absl::InternalError(common::StrCat("the secure sum holds ", round.sum().size(),
                                              " values; the round expects ", length));
  return &round.sum();
}

// The fixed `divisor` (> 0), or the survivors' Σ w_k: their accepted weights (the claimed
// examples) over the instance's weight cap.
absl::StatusOr<double> DivisorOf(const SecureRound& round, double divisor,
                                 const std::vector<AcceptedUpdate>& survivors) {
  if (divisor > 0) return divisor;
  double weights = 0;
  for (const AcceptedUpdate& u : survivors) weights += static_cast<double>(u.weight);
  const double d = weights / round.config().weight_cap();
  if (!(d > 0))
    return absl::FailedPreconditionError(
        common::StrCat("the secure sum's weights add up to ", d, "; nothing to average"));
  return d;
}

common::SecAggRecord SecAggRecordOf(const v1::SecAggConfig& c) {
  common::SecAggRecord r;
  r.clients = c.cohort_size();
  r.neighbours = c.neighbours();
  r.threshold = c.threshold();
  r.bits = c.bits();
  r.values = c.length();
  r.clip = c.change_clip();
  r.scale = c.scale();
  if (c.noise_num() > 0)
    r.noise_stddev = std::sqrt(static_cast<double>(c.noise_num()) / c.noise_den()) / c.scale();
  return r;
}

// Enters the release of `round`'s sum (its survivors' noise: fewer, less noise, more ε) into
// `out`'s privacy state, starting from `privacy`'s.
absl::Status Spend(const SecureSum::Privacy& privacy, const SecureRound& round, double divisor,
                   RoundOutput& out) {
  common::ClientDpState state = privacy.state;
  const v1::SecAggConfig& c = round.config();
  const common::PrivacyRound entry = ClientDp::SecureEntry(
      privacy.round, privacy.q, c, static_cast<int>(round.survivors().size()));
  ASSIGN_OR_RETURN(out.client_dp, privacy.dp->Spend(entry, divisor, c.change_clip(), state));
  out.dp_state = std::move(state);
  return absl::OkStatus();
}

}  // namespace

SecureSum::SecureSum(const SecureRound* round, common::Adapter start, double divisor,
                     std::optional<Privacy> privacy)
    : round_(round), start_(std::move(start)), divisor_(divisor), privacy_(std::move(privacy)) {}

SecureSum::SecureSum(const SecureRound* round, std::vector<common::MatrixShape> sketch,
                     double divisor, std::optional<Privacy> privacy)
    : round_(round), sketch_(std::move(sketch)), divisor_(divisor), privacy_(std::move(privacy)) {}

absl::StatusOr<RoundOutput> SecureSum::Aggregate(const std::vector<AcceptedUpdate>& updates,
                                                 const UpdateSource&) {
  ASSIGN_OR_RETURN(const std::vector<double>* sum,
                   SumOf(*round_, sketch_ ? static_cast<size_t>(round_->config().length())
                                          : common::TrainableCount(start_)));
  ASSIGN_OR_RETURN(const double divisor, DivisorOf(*round_, divisor_, updates));
  RoundOutput out;
  out.aggregated = round_->survivors();
  out.secure_aggregation = SecAggRecordOf(round_->config());
  if (privacy_) RETURN_IF_ERROR(Spend(*privacy_, *round_, divisor, out));
  size_t k = 0;
  if (sketch_) {
    for (const common::MatrixShape& m : *sketch_) {
      common::MatrixD& s = out.sums.emplace_back(m.rows, m.cols);
      for (Eigen::Index i = 0; i < s.size(); ++i) s.data()[i] = (*sum)[k++];
    }
    out.weight = divisor;
    return out;
  }
  out.adapter = start_;
  for (std::span<float> values : common::TrainableValues(out.adapter))
    for (float& x : values) x = static_cast<float>(x + (*sum)[k++] / divisor);
  for (size_t i = 0; i < out.adapter.num_modules(); ++i) out.adapter.set_scaling(i, 1.0);
  return out;
}

SecureCorrection::SecureCorrection(const SecureRound* round, const Uploads* second,
                                   RoundOutput first, common::Adapter start, double divisor,
                                   double lambda, std::optional<SecureSum::Privacy> privacy)
    : round_(round),
      second_(second),
      first_(std::move(first)),
      start_(std::move(start)),
      divisor_(divisor),
      lambda_(lambda),
      privacy_(std::move(privacy)) {}

absl::StatusOr<RoundOutput> SecureCorrection::Aggregate(const std::vector<AcceptedUpdate>&,
                                                        const UpdateSource&) {
  if (round_ == nullptr || round_->step() != SecureRound::Step::kDone) return first_;
  ASSIGN_OR_RETURN(const std::vector<double>* sum,
                   SumOf(*round_, static_cast<size_t>(round_->config().length())));
  ASSIGN_OR_RETURN(const double divisor, DivisorOf(*round_, divisor_, second_->AcceptedUpdates()));
  RoundOutput out = first_;
  common::SecAggRecord& record = out.secure_correction.emplace(SecAggRecordOf(round_->config()));
  record.summed = static_cast<int>(round_->survivors().size());
  if (privacy_) RETURN_IF_ERROR(Spend(*privacy_, *round_, divisor, out));
  std::vector<common::ModuleReport> modules;
  size_t k = 0;
  for (size_t i = 0; i < out.adapter.num_modules(); ++i) {
    const common::MatrixD a_bar = out.adapter.A(i).cast<double>();
    common::MatrixD g = common::ProjectedProduct(start_, i, a_bar);
    for (Eigen::Index j = 0; j < g.size(); ++j) g.data()[j] += (*sum)[k++] / divisor;
    common::LoraFairSolution solution = common::SolveLoraFairInRowSpace(
        std::move(g), a_bar, out.adapter.B(i).cast<double>(), {.lambda = lambda_});
    out.adapter.B(i) = solution.b.cast<float>();
    solution.b.resize(0, 0);
    modules.push_back({.lora_fair = std::move(solution)});
  }
  SetLoraFairObjectives(modules, out);
  return out;
}

}  // namespace fedlora::server
