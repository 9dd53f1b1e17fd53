#include "server/round_close.h"

#include <algorithm>
#include <chrono>

#include "common/base/status_macros.h"
#include "common/tensor/blob.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;

// The round's result from its updates (in client-id order, so the sums repeat exactly). FedIT and
// Fed-SB were summed as the updates arrived; FLoRA and LoRA-FAIR need every client's factors.
absl::StatusOr<common::AggregateResult> Aggregate(const RoundInputs& in,
                                                  const std::vector<std::string>& arrived,
                                                  Ledger* ledger, nlohmann::json* dp_metrics) {
  const Method method = ledger->method;
  std::vector<Adapter> updates;
  std::vector<double> weights;
  const bool streamed = method == Method::kFedIt || method == Method::kFedSb;
  for (const std::string& id : arrived) {
    PendingUpload& u = in.uploads->all().at(id);
    weights.push_back(static_cast<double>(u.num_examples));
    if (!streamed) updates.push_back(std::move(u.adapter));
  }
  absl::StatusOr<common::AggregateResult> result;
  if (in.dp != nullptr) {
    result = in.dp->Finish(updates, &*ledger->client_dp, dp_metrics);
  } else if (streamed) {
    result.emplace();
    ASSIGN_OR_RETURN(result->adapter, in.sums->Mean());
  } else {
    common::AggregateOptions options{method, {}};
    options.lora_fair.lambda = in.options->lora_fair_lambda;
    result = common::Aggregate(updates, weights, options);
  }
  for (size_t k = 0; k < updates.size(); ++k)  // the updates stay with the round
    in.uploads->all().at(arrived[k]).adapter = std::move(updates[k]);
  return result;
}

}  // namespace

absl::StatusOr<nlohmann::json> CloseRound(const RoundFacts& facts, const RoundInputs& in) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<std::string> arrived = in.uploads->ArrivedIds();
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
    if (!std::binary_search(arrived.begin(), arrived.end(), id) && !facts.declined.contains(id))
      dropped.push_back(id);
  }
  nlohmann::json record = {
      {"round", facts.round},
      {"attempt", facts.attempt + 1},
      {"version", facts.round},
      {"method", common::MethodName(method)},
      {"cohort", facts.cohort},
      {"arrived", arrived},
      {"dropped", dropped},
      {"rejected", facts.rejected},
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
