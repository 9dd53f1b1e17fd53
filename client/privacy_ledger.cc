#include "client/privacy_ledger.h"

#include <spdlog/spdlog.h>

#include <filesystem>

#include "common/file_util.h"
#include "common/status_macros.h"
#include "common/strings.h"

namespace fedlora::client {

using common::StrCat;

absl::StatusOr<PrivacyLedger> PrivacyLedger::Load(const DpSgdSettings& settings) {
  nlohmann::json json = {{"delta", settings.delta}, {"rounds", nlohmann::json::array()}};
  if (std::filesystem::exists(settings.ledger)) {
    ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(settings.ledger));
    json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (json.is_discarded() || !json.contains("rounds") || !json["rounds"].is_array()) {
      return absl::DataLossError(StrCat("privacy ledger ", settings.ledger,
                                        " is not a fedlora ledger; refusing to train without "
                                        "knowing what was spent"));
    }
  }
  return PrivacyLedger(settings, std::move(json));
}

nlohmann::json PrivacyLedger::Entry(int64_t round, double q, int64_t steps) const {
  return {{"round", round}, {"q", q}, {"sigma", settings_.dp.noise_multiplier}, {"steps", steps}};
}

absl::StatusOr<common::PrivacySpent> PrivacyLedger::SpentWith(const nlohmann::json& entry) const {
  nlohmann::json rounds = json_["rounds"];
  rounds.push_back(entry);
  return common::SpentOver(rounds, settings_.delta);
}

absl::Status PrivacyLedger::Admit(int64_t round, double q, int64_t steps) const {
  if (!(settings_.target_epsilon > 0)) return absl::OkStatus();
  ASSIGN_OR_RETURN(common::PrivacySpent next, SpentWith(Entry(round, q, steps)));
  if (next.epsilon <= settings_.target_epsilon) return absl::OkStatus();
  return absl::ResourceExhaustedError(
      StrCat("privacy budget: round ", round, " would bring epsilon to ", next.epsilon, " (delta ",
             settings_.delta, "), past the target ", settings_.target_epsilon, "; declining it"));
}

absl::Status PrivacyLedger::Record(int64_t round, double q, int64_t steps,
                                   v1::TrainMetrics& metrics) {
  const nlohmann::json entry = Entry(round, q, steps);
  ASSIGN_OR_RETURN(common::PrivacySpent spent, SpentWith(entry));
  json_["rounds"].push_back(entry);
  RETURN_IF_ERROR(common::WriteFileAtomically(settings_.ledger, json_.dump(2) + "\n"));
  metrics.set_dp_epsilon(spent.epsilon);
  metrics.set_dp_delta(settings_.delta);
  spdlog::info("round {}: DP-SGD spent epsilon {:.4f} (delta {}) in all (sigma {:.4g}, q {:.4g})",
               round, spent.epsilon, settings_.delta, settings_.dp.noise_multiplier, q);
  return absl::OkStatus();
}

}  // namespace fedlora::client
