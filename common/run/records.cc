#include "common/run/records.h"

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {

using nlohmann::json;

json ClientDpSpend::ToJson() const {
  json j = {{"epsilon", epsilon ? json(*epsilon) : json()},
            {"delta", delta},
            {"order", order},
            {"sample_rate", sample_rate},
            {"expected_clients", expected_clients},
            {"noise_multiplier", noise_multiplier},
            {"clip", clip}};
  if (update_noise_multiplier) j["update_noise_multiplier"] = *update_noise_multiplier;
  if (next_clip) j["next_clip"] = *next_clip;
  return j;
}

absl::StatusOr<ClientDpSpend> ClientDpSpend::FromJson(JsonReader& in) {
  ClientDpSpend s;
  in.Maybe("epsilon", &s.epsilon)
      .Get("delta", &s.delta)
      .Get("order", &s.order)
      .Get("sample_rate", &s.sample_rate)
      .Get("expected_clients", &s.expected_clients)
      .Get("noise_multiplier", &s.noise_multiplier)
      .Get("clip", &s.clip)
      .Maybe("update_noise_multiplier", &s.update_noise_multiplier)
      .Maybe("next_clip", &s.next_clip);
  return s;
}

json SecAggRecord::ToJson() const {
  json j = {{"clients", clients}, {"neighbours", neighbours}, {"threshold", threshold},
            {"bits", bits},       {"values", values},         {"clip", clip},
            {"scale", scale}};
  if (noise_stddev) j["noise_stddev"] = *noise_stddev;
  if (summed) j["summed"] = *summed;
  return j;
}

absl::StatusOr<SecAggRecord> SecAggRecord::FromJson(JsonReader& in) {
  SecAggRecord s;
  in.Get("clients", &s.clients)
      .Get("neighbours", &s.neighbours)
      .Get("threshold", &s.threshold)
      .Get("bits", &s.bits)
      .Get("values", &s.values)
      .Get("clip", &s.clip)
      .Get("scale", &s.scale)
      .Maybe("noise_stddev", &s.noise_stddev)
      .Maybe("summed", &s.summed);
  return s;
}

void Participation::AddTo(json& j) const {
  j["attempt"] = attempt;
  j["cohort"] = cohort;
  j["arrived"] = arrived;
  j["rejected"] = rejected;
  j["declined"] = declined;
  if (!removed.empty()) j["removed"] = removed;
  j["bytes_up"] = bytes_up;
  j["bytes_down"] = bytes_down;
  j["elapsed_seconds"] = elapsed_seconds;
}

absl::StatusOr<Participation> Participation::FromJson(JsonReader& in) {
  Participation p;
  json rejected;
  in.Get("attempt", &p.attempt)
      .Get("cohort", &p.cohort)
      .Get("arrived", &p.arrived)
      .Get("rejected", &rejected);
  if (rejected.is_array()) {  // written before the counts: one entry per refused update
    std::vector<std::string> each;
    in.Get("rejected", &each);
    for (const std::string& id : each) ++p.rejected[id];
  } else {
    in.Get("rejected", &p.rejected);
  }
  in.Get("declined", &p.declined)
      .Maybe("removed", &p.removed)
      .Get("bytes_up", &p.bytes_up)
      .Get("bytes_down", &p.bytes_down)
      .Get("elapsed_seconds", &p.elapsed_seconds);
  return p;
}

json InitStepRecord::ToJson() const {
  json j = {{"step", step}, {"steps", steps}, {"product", product}};
  who.AddTo(j);
  if (client_dp) j["client_dp"] = client_dp->ToJson();
  if (!init_bytes_up.empty() || !init_bytes_down.empty()) {
    j["init_bytes_up"] = init_bytes_up;
    j["init_bytes_down"] = init_bytes_down;
  }
  return j;
}

absl::StatusOr<InitStepRecord> InitStepRecord::FromJson(JsonReader& in) {
  InitStepRecord r;
  in.Get("step", &r.step)
      .Get("steps", &r.steps)
      .Get("product", &r.product)
      .Maybe("client_dp", &r.client_dp)
      .Maybe("init_bytes_up", &r.init_bytes_up)
      .Maybe("init_bytes_down", &r.init_bytes_down);
  ASSIGN_OR_RETURN(r.who, Participation::FromJson(in));
  if (in.ok() && (r.step < 1 || r.step > r.steps))
    in.Fail("step", StrCat("step ", r.step, " of ", r.steps, " is out of range"));
  return r;
}

json RoundRecord::ToJson() const {
  json j = {{"round", round},
            {"version", round},
            {"method", MethodName(method)},
            {"dropped", dropped},
            {"late", late},
            {"mean_loss_before", mean_loss_before},
            {"mean_train_loss", mean_train_loss},
            {"aggregation_seconds", aggregation_seconds},
            {"updates", updates},
            {"examples", examples},
            {"weight_share", weight_share},
            {"global_blob", global_blob},
            {"blob_bytes", blob_bytes}};
  who.AddTo(j);
  if (client_dp) j["client_dp"] = client_dp->ToJson();
  if (!update_norms.empty()) j["update_norms"] = update_norms;
  if (!norm_outliers.empty()) j["norm_outliers"] = norm_outliers;
  if (!dp_epsilon.empty()) j["dp_epsilon"] = dp_epsilon;
  if (lora_fair_objective) j["lora_fair_objective"] = *lora_fair_objective;
  if (fedit_objective) j["fedit_objective"] = *fedit_objective;
  if (secure_aggregation) j["secure_aggregation"] = secure_aggregation->ToJson();
  if (secure_correction) j["secure_correction"] = secure_correction->ToJson();
  return j;
}

absl::StatusOr<RoundRecord> RoundRecord::FromJson(JsonReader& in) {
  RoundRecord r;
  std::string method;
  int64_t version = 0;
  in.Get("round", &r.round)
      .Get("version", &version)
      .Get("method", &method)
      .Get("dropped", &r.dropped)
      .Get("late", &r.late)
      .Get("mean_loss_before", &r.mean_loss_before)
      .Get("mean_train_loss", &r.mean_train_loss)
      .Get("aggregation_seconds", &r.aggregation_seconds)
      .Get("updates", &r.updates)
      .Get("examples", &r.examples)
      .Get("weight_share", &r.weight_share)
      .Get("global_blob", &r.global_blob)
      .Get("blob_bytes", &r.blob_bytes)
      .Maybe("client_dp", &r.client_dp)
      .Maybe("update_norms", &r.update_norms)
      .Maybe("norm_outliers", &r.norm_outliers)
      .Maybe("dp_epsilon", &r.dp_epsilon)
      .Maybe("lora_fair_objective", &r.lora_fair_objective)
      .Maybe("fedit_objective", &r.fedit_objective)
      .Maybe("secure_aggregation", &r.secure_aggregation)
      .Maybe("secure_correction", &r.secure_correction);
  ASSIGN_OR_RETURN(r.who, Participation::FromJson(in));
  if (!in.ok()) return r;
  if (absl::StatusOr<Method> m = ParseMethod(method); m.ok())
    r.method = *m;
  else
    in.Fail("method", std::string(m.status().message()));
  if (r.round < 1) in.Fail("round", StrCat("round ", r.round, "; rounds count from 1"));
  if (version != r.round)
    in.Fail("version", StrCat("version ", version, " of round ", r.round, "; they are equal"));
  return r;
}

json MetricsLine::ToJson() const {
  json j = record.ToJson();
  if (eval_loss) j["eval_loss"] = *eval_loss;
  if (eval_accuracy) j["eval_accuracy"] = *eval_accuracy;
  if (!eval_accuracy_by_task.empty()) j["eval_accuracy_by_task"] = eval_accuracy_by_task;
  return j;
}

absl::StatusOr<MetricsLine> MetricsLine::FromJson(JsonReader& in) {
  MetricsLine m;
  in.Maybe("eval_loss", &m.eval_loss)
      .Maybe("eval_accuracy", &m.eval_accuracy)
      .Maybe("eval_accuracy_by_task", &m.eval_accuracy_by_task);
  ASSIGN_OR_RETURN(m.record, RoundRecord::FromJson(in));
  return m;
}

absl::StatusOr<std::vector<MetricsLine>> ReadMetrics(const std::filesystem::path& file) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(file, Symlinks::kRefuse));
  std::vector<MetricsLine> lines;
  size_t number = 0;
  for (size_t start = 0, end; start < text.size(); start = end + 1) {
    end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    ++number;
    const std::string where = StrCat(file.string(), " line ", number);
    const json j =
        json::parse(text.substr(start, end - start), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return absl::DataLossError(StrCat(where, ": not a JSON object"));
    ASSIGN_OR_RETURN(MetricsLine line, JsonReader::Parse<MetricsLine>(j, where));
    lines.push_back(std::move(line));
  }
  return lines;
}

}  // namespace fedlora::common
