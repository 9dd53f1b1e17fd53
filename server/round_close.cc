#include "server/round_close.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <optional>

#include "common/base/status_macros.h"
#include "common/tensor/blob.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;

// The round's result from its updates (in client-id order, so the sums repeat exactly). FedIT and
// Fed-SB were summed as the updates arrived, unless the median norm bound held them to the close;
// FLoRA and LoRA-FAIR need every client's factors.
absl::StatusOr<common::AggregateResult> Aggregate(const RoundInputs& in,
                                                  const std::vector<std::string>& arrived,
                                                  Ledger* ledger, nlohmann::json* dp_metrics) {
  const Method method = ledger->method;
  std::vector<Adapter> updates;
  std::vector<double> weights;
  const bool streamed = method == Method::kFedIt || method == Method::kFedSb;
  const bool held = HoldsUpdates(method, *in.options);
  for (const std::string& id : arrived) {
    PendingUpload& u = in.uploads->all().at(id);
    weights.push_back(static_cast<double>(u.num_examples));
    if (held) updates.push_back(std::move(u.adapter));
  }
  absl::StatusOr<common::AggregateResult> result;
  if (in.dp != nullptr) {
    result = in.dp->Finish(updates, &*ledger->client_dp, dp_metrics);
  } else if (streamed) {
    // Held updates are summed now, onto a copy of the round's sums (empty then).
    std::optional<common::StreamingAverage> held_sums;
    if (held) {
      held_sums = *in.sums;
      for (size_t k = 0; k < updates.size(); ++k) held_sums->Add(updates[k], weights[k]);
    }
    if (absl::StatusOr<Adapter> mean = held ? held_sums->Mean() : in.sums->Mean(); mean.ok())
      result = common::AggregateResult{.adapter = *std::move(mean)};
    else
      result = mean.status();
  } else {
    common::AggregateOptions options{method, {}};
    options.lora_fair.lambda = in.options->lora_fair_lambda;
    result = common::Aggregate(updates, weights, options);
  }
  for (size_t k = 0; k < updates.size(); ++k)  // the updates stay with the round
    in.uploads->all().at(arrived[k]).adapter = std::move(updates[k]);
  return result;
}

// --max-update-norm-ratio: the accepted updates whose norm exceeds that multiple of the lower
// median of the round's norms (id → norm), taken out of `arrived`. The lower median: with two
// updates, the smaller one's norm, so that one of two cannot set its own bound.
nlohmann::json TakeNormOutliers(const RoundInputs& in, int64_t round,
                                std::vector<std::string>* arrived) {
  nlohmann::json outliers = nlohmann::json::object();
  const double ratio = in.options->max_update_norm_ratio;
  if (ratio == 0 || arrived->empty()) return outliers;
  std::vector<double> norms;
  for (const std::string& id : *arrived) norms.push_back(in.uploads->all().at(id).norm);
  std::nth_element(norms.begin(), norms.begin() + (norms.size() - 1) / 2, norms.end());
  const double median = norms[(norms.size() - 1) / 2];
  std::erase_if(*arrived, [&](const std::string& id) {
    const double norm = in.uploads->all().at(id).norm;
    if (norm <= ratio * median) return false;
    spdlog::warn(
        "round {}: left {}'s update out of the aggregate: its norm ‖s·B·A‖_F = {:.6g} exceeds {} × "
        "the round's median norm {:.6g} (--max-update-norm-ratio)",
        round, id, norm, ratio, median);
    outliers[id] = norm;
    return true;
  });
  return outliers;
}

}  // namespace

absl::StatusOr<nlohmann::json> CloseRound(const RoundFacts& facts, const RoundInputs& in) {
  const auto start = std::chrono::steady_clock::now();
  std::vector<std::string> arrived = in.uploads->ArrivedIds();
  const nlohmann::json norm_outliers = TakeNormOutliers(in, facts.round, &arrived);
  Ledger ledger = in.store->ledger();
  nlohmann::json client_dp;
  ASSIGN_OR_RETURN(common::AggregateResult result, Aggregate(in, arrived, &ledger, &client_dp));
  const Method method = ledger.method;
  const std::string bytes =
      common::EncodeAdapter(result.adapter, method == Method::kFedSb ? common::AdapterParts::kROnly
                                                                     : common::AdapterParts::kAll);
  const BlobKind kind = method == Method::kFlora   ? BlobKind::kDelta
                        : method == Method::kFedSb ? BlobKind::kR
                                                   : BlobKind::kAdapter;
  ASSIGN_OR_RETURN(BlobRef blob, in.store->PutBlob(bytes, kind, facts.round));

  double loss_before = 0, loss_after = 0, examples = 0;
  nlohmann::json bytes_up = nlohmann::json::object(), update_blobs = nlohmann::json::object(),
                 update_examples = nlohmann::json::object(),
                 dp_epsilon = nlohmann::json::object();  // DP-SGD clients' spent budgets
  for (const std::string& id : arrived) {
    const PendingUpload& u = in.uploads->all().at(id);
    loss_before += u.num_examples * u.metrics.loss_before();
    loss_after += u.num_examples * u.metrics.loss_after();
    examples += u.num_examples;
    bytes_up[id] = u.total_size;
    update_blobs[id] = u.sha256;
    update_examples[id] = u.num_examples;
    if (u.metrics.dp_epsilon() > 0) dp_epsilon[id] = u.metrics.dp_epsilon();
  }
  // What share of the aggregate each update had (method-independent: its examples' share).
  nlohmann::json weight_share = nlohmann::json::object();
  for (const std::string& id : arrived)
    weight_share[id] = static_cast<double>(in.uploads->all().at(id).num_examples) / examples;
  std::vector<std::string> dropped;
  for (const std::string& id : facts.cohort) {
    if (!std::binary_search(arrived.begin(), arrived.end(), id) && !facts.declined.contains(id) &&
        !norm_outliers.contains(id))
      dropped.push_back(id);
  }
  std::vector<std::string> rejected = facts.rejected;
  for (const auto& [id, norm] : norm_outliers.items()) rejected.push_back(id);
  nlohmann::json record = {
      {"round", facts.round},
      {"attempt", facts.attempt + 1},
      {"version", facts.round},
      {"method", common::MethodName(method)},
      {"cohort", facts.cohort},
      {"arrived", arrived},
      {"dropped", dropped},
      {"rejected", rejected},
      {"declined", facts.declined},
      {"late", facts.late},
      {"bytes_up", bytes_up},
      {"bytes_down", facts.bytes_down},
      {"mean_loss_before", loss_before / examples},
      {"mean_train_loss", loss_after / examples},
      {"aggregation_seconds",
       std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count()},
      {"elapsed_seconds", facts.elapsed_seconds},
      {"updates", update_blobs},
      {"examples", update_examples},
      {"weight_share", weight_share},
      {"global_blob", blob.sha256},
      {"blob_bytes", blob.size}};
  if (!client_dp.empty()) record["client_dp"] = client_dp;
  if (!norm_outliers.empty()) record["norm_outliers"] = norm_outliers;
  if (!dp_epsilon.empty()) record["dp_epsilon"] = dp_epsilon;
  if (method == Method::kLoraFair) {
    double objective = 0, fedit = 0;
    for (const auto& m : result.modules) {
      objective += m.lora_fair.objective / result.modules.size();
      fedit += m.lora_fair.fedit_objective / result.modules.size();
    }
    record["lora_fair_objective"] = objective;
    record["fedit_objective"] = fedit;
  }
  ledger.versions.push_back({facts.round, {blob}, record});
  RETURN_IF_ERROR(in.store->SaveLedger(ledger));  // the commit
  return record;
}

}  // namespace fedlora::server
