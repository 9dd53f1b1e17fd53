// A client's own DP-SGD spending across the rounds it took part in (ALGORITHMS.md: a client's
// privacy composes over its rounds, steps = local steps × rounds). The ledger is a JSON file
// rewritten atomically after every round, so a restarted client still knows what it has spent;
// a round that would take ε past the target is declined before any training.
#ifndef FEDLORA_CLIENT_PRIVACY_LEDGER_H_
#define FEDLORA_CLIENT_PRIVACY_LEDGER_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "absl/status/statusor.h"
#include "common/llm/trainer.h"
#include "common/privacy/privacy_accountant.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::client {

// DP-SGD settings of a workload: on when dp.noise_multiplier ≥ 0.
struct DpSgdSettings {
  common::TrainOptions::DpSgd dp;
  double delta = 1e-5;
  double target_epsilon = 0;  // > 0: decline (and leave the run) before passing it
  std::string ledger = "fedlora-privacy.json";
  // σ of each step of Fed-SB's initialisation (full batch, q = 1); < 0: dp.noise_multiplier.
  double init_noise_multiplier = -1;
  bool enabled() const { return dp.noise_multiplier >= 0; }
  double init_sigma() const {
    return init_noise_multiplier >= 0 ? init_noise_multiplier : dp.noise_multiplier;
  }
};

class PrivacyLedger {
 public:
  // Reads `settings.ledger` if it exists (DATA_LOSS when it is not a ledger: training without
  // knowing what was spent would be wrong).
  static absl::StatusOr<PrivacyLedger> Load(const DpSgdSettings& settings);

  // RESOURCE_EXHAUSTED, saying so, when `steps` more steps at rate q would pass the target.
  absl::Status Admit(int64_t round, double q, int64_t steps) const {
    return Admit(Entry(round, q, steps));
  }
  // Adds the round, rewrites the file, and puts ε spent in all (and δ) into `metrics` and the log.
  absl::Status Record(int64_t round, double q, int64_t steps, v1::TrainMetrics& metrics) {
    return Record(Entry(round, q, steps), metrics);
  }
  // A step of Fed-SB's initialisation: q = 1 (every record), σ = settings.init_sigma().
  absl::Status AdmitInitStep(int64_t round) const { return Admit(InitEntry(round)); }
  absl::Status RecordInitStep(int64_t round) {
    v1::TrainMetrics spent;
    return Record(InitEntry(round), spent);
  }

 private:
  PrivacyLedger(DpSgdSettings settings, common::PrivacyHistory rounds)
      : settings_(std::move(settings)), rounds_(std::move(rounds)) {}
  common::PrivacyRound Entry(int64_t round, double q, int64_t steps) const;  // one round's record
  common::PrivacyRound InitEntry(int64_t round) const {
    return {round, 1.0, settings_.init_sigma(), 1};
  }
  absl::Status Admit(const common::PrivacyRound& entry) const;
  absl::Status Record(const common::PrivacyRound& entry, v1::TrainMetrics& metrics);
  // ε of everything recorded plus `entry`.
  absl::StatusOr<common::PrivacySpent> SpentWith(const common::PrivacyRound& entry) const;

  DpSgdSettings settings_;
  // On disk: {"delta", "rounds": [{"round", "q", "sigma", "steps"}]}.
  common::PrivacyHistory rounds_;
};

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_PRIVACY_LEDGER_H_
