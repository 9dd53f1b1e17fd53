// fedlora privacy — the RDP accountant of the sampled Gaussian mechanism
// (common/privacy/privacy_accountant.h):
// clang-format off
//   --noise-multiplier Z --sample-rate Q --steps T --delta D   → ε and the best order
//   --epsilon E --sample-rate Q --steps T --delta D            → the smallest noise multiplier that meets E
// clang-format on
#ifndef FEDLORA_CLIENT_TOOL_PRIVACY_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_PRIVACY_COMMAND_H_

#include "absl/status/status.h"

namespace fedlora::tool {

struct PrivacyCommandOptions {
  double noise_multiplier = -1;  // σ: noise stddev / clipping norm; < 0: not given
  double epsilon = -1;           // or a target ε to find σ for; < 0: not given
  double sample_rate = -1;       // q per step (required)
  double steps = -1;             // T (required)
  double delta = 1e-5;
  bool json = false;  // end with a JSON line (epsilon, order, noise_multiplier, ...)
};

// Prints ε for σ, or σ for ε. Needs exactly one of noise_multiplier and epsilon.
absl::Status Run(const PrivacyCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_PRIVACY_COMMAND_H_
