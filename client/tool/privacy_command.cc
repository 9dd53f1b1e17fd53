#include "client/tool/privacy_command.h"

#include <cstdio>
#include <nlohmann/json.hpp>

#include "client/tool/commands.h"
#include "common/base/status_macros.h"
#include "common/privacy/privacy_accountant.h"

namespace fedlora::tool {

absl::Status Run(const PrivacyCommandOptions& a) {
  if ((a.noise_multiplier < 0) == (a.epsilon < 0)) {
    return absl::InvalidArgumentError(
        "give exactly one of --noise-multiplier (to get epsilon) or "
        "--epsilon (to get the noise multiplier)");
  }
  if (a.noise_multiplier >= 0) {
    ASSIGN_OR_RETURN(const common::PrivacySpent spent,
                     common::EpsilonFor(a.sample_rate, a.noise_multiplier, a.steps, a.delta));
    std::printf(
        "epsilon %.6f at delta %g (best RDP order %g) for %g steps, sample rate %g, noise "
        "multiplier %g\n",
        spent.epsilon, a.delta, spent.order, a.steps, a.sample_rate, a.noise_multiplier);
    if (a.json)
      PrintJsonLine({{"epsilon", spent.epsilon},
                     {"order", spent.order},
                     {"delta", a.delta},
                     {"noise_multiplier", a.noise_multiplier},
                     {"sample_rate", a.sample_rate},
                     {"steps", a.steps}});
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(const double sigma,
                   common::NoiseMultiplierFor(a.epsilon, a.sample_rate, a.steps, a.delta));
  ASSIGN_OR_RETURN(const common::PrivacySpent spent,
                   common::EpsilonFor(a.sample_rate, sigma, a.steps, a.delta));
  std::printf(
      "noise multiplier %.6f meets epsilon %g at delta %g (spends %.6f, best RDP order %g) for %g "
      "steps, "
      "sample rate %g\n",
      sigma, a.epsilon, a.delta, spent.epsilon, spent.order, a.steps, a.sample_rate);
  if (a.json)
    PrintJsonLine({{"noise_multiplier", sigma},
                   {"epsilon", spent.epsilon},
                   {"target_epsilon", a.epsilon},
                   {"order", spent.order},
                   {"delta", a.delta},
                   {"sample_rate", a.sample_rate},
                   {"steps", a.steps}});
  return absl::OkStatus();
}

void AddPrivacyCommand(CLI::App& app) {
  auto args = std::make_shared<PrivacyCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "privacy",
      "Privacy budget of DP-SGD / DP-FedAvg (RDP accountant of the sampled Gaussian mechanism)");
  cmd->add_option("--noise-multiplier", args->noise_multiplier,
                  "sigma: noise stddev / clipping norm");
  cmd->add_option("--epsilon", args->epsilon,
                  "target epsilon: find the smallest noise multiplier that meets it");
  cmd->add_option(
         "--sample-rate", args->sample_rate,
         "q: probability that an example (DP-SGD) or a client (DP-FedAvg) takes part in a step")
      ->required();
  cmd->add_option("--steps", args->steps,
                  "number of steps (DP-SGD: local steps x rounds taken part in)")
      ->required();
  cmd->add_option("--delta", args->delta, "delta")->capture_default_str();
  cmd->add_flag("--json", args->json,
                "end with a JSON line (epsilon, order, noise_multiplier, ...)");
  cmd->callback([args] { ExitIfError(Run(*args)); });
}

}  // namespace fedlora::tool
