#include "server/round/close.h"

#include <algorithm>
#include <chrono>

#include "common/base/status_macros.h"
#include "common/tensor/blob.h"

namespace fedlora::server {

using common::Method;

common::RoundRecord RecordOf(const RoundFacts& facts, const RoundOutput& output,
                             const Uploads& uploads, Method method) {
  common::RoundRecord r;
  r.round = facts.round;
  r.method = method;
  r.who = facts.who;
  r.who.arrived = output.aggregated;
  r.late = facts.late;
  double loss_before = 0, loss_after = 0, weight = 0;
  for (const std::string& id : output.aggregated) {
    const PendingUpload& u = uploads.all().at(id);
    const double w = static_cast<double>(u.weight);
    loss_before += w * u.metrics.loss_before();
    loss_after += w * u.metrics.loss_after();
    weight += w;
    r.who.bytes_up[id] = u.total_size;
    r.updates[id] = u.sha256;
    r.examples[id] = u.weight;
    if (u.metrics.dp_epsilon() > 0) r.dp_epsilon[id] = u.metrics.dp_epsilon();
  }
  // What share of the aggregate each update had (method-independent: its weight's share).
  for (const std::string& id : output.aggregated)
    r.weight_share[id] = static_cast<double>(uploads.all().at(id).weight) / weight;
  r.mean_loss_before = loss_before / weight;
  r.mean_train_loss = loss_after / weight;
  if (output.client_dp == std::nullopt && !output.secure_aggregation) {
    for (const AcceptedUpdate& u : uploads.AcceptedUpdates()) r.update_norms[u.client] = u.norm;
  }
  for (const auto& [id, norm] : output.norm_outliers) ++r.who.rejected[id];
  for (const std::string& id : facts.who.cohort) {
    if (!std::binary_search(output.aggregated.begin(), output.aggregated.end(), id) &&
        !facts.who.declined.contains(id) && !output.norm_outliers.contains(id))
      r.dropped.push_back(id);
  }
  r.norm_outliers = output.norm_outliers;
  r.client_dp = output.client_dp;
  r.lora_fair_objective = output.lora_fair_objective;
  r.fedit_objective = output.fedit_objective;
  r.secure_aggregation = output.secure_aggregation;
  r.secure_correction = output.secure_correction;
  return r;
}

absl::StatusOr<common::RoundRecord> CloseRound(const RoundFacts& facts, Accumulator& accumulator,
                                               const UpdateSource& source, const Uploads& uploads,
                                               StateStore& store) {
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(const RoundOutput output,
                   accumulator.Aggregate(uploads.AcceptedUpdates(), source));
  Ledger ledger = store.ledger();
  const Method method = ledger.method;
  const std::string bytes =
      common::EncodeAdapter(output.adapter, method == Method::kFedSb ? common::AdapterParts::kROnly
                                                                     : common::AdapterParts::kAll);
  ASSIGN_OR_RETURN(BlobRef blob, store.PutBlob(bytes, *common::VersionBlobKind(method, facts.round),
                                               facts.round));
  common::RoundRecord record = RecordOf(facts, output, uploads, method);
  record.global_blob = blob.sha256;
  record.blob_bytes = blob.size;
  record.aggregation_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (output.dp_state) ledger.client_dp = output.dp_state;
  ledger.versions.push_back({facts.round, {std::move(blob)}, record, std::nullopt});
  RETURN_IF_ERROR(store.SaveLedger(ledger));  // the commit
  return record;
}

}  // namespace fedlora::server
