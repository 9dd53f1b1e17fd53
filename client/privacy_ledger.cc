#include "client/privacy_ledger.h"

#include <spdlog/spdlog.h>

#include <filesystem>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::client {

using common::StrCat;

absl::StatusOr<PrivacyLedger> PrivacyLedger::Load(const DpSgdSettings& settings) {
  common::PrivacyHistory rounds;
  if (std::filesystem::exists(settings.ledger)) {
    ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(settings.ledger));
    const nlohmann::json json = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    absl::StatusOr<common::PrivacyHistory> read =
        json.is_object() && json.contains("rounds")
            ? common::PrivacyHistoryFromJson(json["rounds"], settings.ledger)
            : absl::InvalidArgumentError("no \"rounds\"");
    if (!read.ok()) {
      return absl::DataLossError(StrCat("privacy ledger ", settings.ledger,
                                        " is not a fedlora ledger (", read.status().message(),
                                        "); refusing to train without knowing what was spent"));
    }
    rounds = *std::move(read);
  }
  return PrivacyLedger(settings, std::move(rounds));
}

common::PrivacyRound PrivacyLedger::Entry(int64_t round, double q, int64_t steps) const {
  return {round, q, settings_.dp.noise_multiplier, static_cast<double>(steps)};
}

absl::StatusOr<common::PrivacySpent> PrivacyLedger::SpentWith(
    const common::PrivacyRound& entry) const {
  common::PrivacyHistory rounds = rounds_;
  rounds.push_back(entry);
  return common::SpentOver(rounds, settings_.delta);
}

absl::Status PrivacyLedger::Admit(const common::PrivacyRound& entry) const {
  if (!(settings_.target_epsilon > 0)) return absl::OkStatus();
  ASSIGN_OR_RETURN(common::PrivacySpent next, SpentWith(entry));
  if (next.epsilon <= settings_.target_epsilon) return absl::OkStatus();
  return absl::ResourceExhaustedError(StrCat(
      "privacy budget: round ", entry.round, " would bring epsilon to ", next.epsilon, " (delta ",
      settings_.delta, "), past the target ", settings_.target_epsilon, "; declining it"));
}

absl::Status PrivacyLedger::Record(const common::PrivacyRound& entry, v1::TrainMetrics& metrics) {
  ASSIGN_OR_RETURN(common::PrivacySpent spent, SpentWith(entry));
  common::PrivacyHistory rounds = rounds_;
  rounds.push_back(entry);
  const nlohmann::json json = {{"delta", settings_.delta},
                               {"rounds", common::PrivacyHistoryToJson(rounds)}};
  // The file first: memory follows only what is on disk, so a failed write loses nothing.
  RETURN_IF_ERROR(common::WriteFileAtomically(settings_.ledger, json.dump(2) + "\n"));
  rounds_ = std::move(rounds);
  metrics.set_dp_epsilon(spent.epsilon);
  metrics.set_dp_delta(settings_.delta);
  spdlog::info("round {}: DP-SGD spent epsilon {:.4f} (delta {}) in all (sigma {:.4g}, q {:.4g})",
               entry.round, spent.epsilon, settings_.delta, entry.sigma, entry.q);
  return absl::OkStatus();
}

}  // namespace fedlora::client
