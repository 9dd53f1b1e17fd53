#include "server/accumulate/every_factor.h"

#include "common/base/status_macros.h"

namespace fedlora::server {

void SetLoraFairObjectives(const std::vector<common::ModuleReport>& modules, RoundOutput& out) {
  if (modules.empty()) return;
  double objective = 0, fedit = 0;
  for (const common::ModuleReport& m : modules) {
    objective += m.lora_fair.objective;
    fedit += m.lora_fair.fedit_objective;
  }
  out.lora_fair_objective = objective / static_cast<double>(modules.size());
  out.fedit_objective = fedit / static_cast<double>(modules.size());
}

absl::StatusOr<RoundOutput> EveryFactor::Aggregate(const std::vector<AcceptedUpdate>& updates,
                                                   const UpdateSource& source) {
  std::vector<common::Adapter> adapters;
  std::vector<double> weights;
  RETURN_IF_ERROR(
      FoldUpdates(updates, source, [&](const AcceptedUpdate& u, common::Adapter& update) {
        adapters.push_back(std::move(update));
        weights.push_back(static_cast<double>(u.weight));
        return absl::OkStatus();
      }));
  ASSIGN_OR_RETURN(common::AggregateResult result, common::Aggregate(adapters, weights, options_));
  RoundOutput out;
  out.adapter = std::move(result.adapter);
  out.aggregated = ClientsOf(updates);
  if (options_.method == common::Method::kLoraFair) SetLoraFairObjectives(result.modules, out);
  return out;
}

}  // namespace fedlora::server
