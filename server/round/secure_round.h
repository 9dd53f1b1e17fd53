// A round under secure aggregation (common/secagg/protocol.h), as the lifecycle drives it. The
// round's training step ends with each member's keys (sent once it has trained); four short steps
// follow, each over the clients that took the one before:
//   shares   they exchange their sealed shares        (SECAGG task: the roster)
//   input    they upload their masked input           (SECAGG task: the inbox; then Upload)
//   consent  they sign the survivor set               (SECAGG task: the survivors)
//   unmask   they reveal shares                       (SECAGG task: the consents)
// A step ends when every client it waits for has answered, or when the lifecycle gives up on the
// rest (silent, or at --secagg-step-timeout-s); ending it with too few clients left for the
// threshold fails the round, which is then retried with a new cohort and fresh keys — a wrong sum
// is never committed. The instance's config (graph, quantisation, seeds) is drawn when the round
// opens; nothing of it is written to disk, so a restarted coordinator starts the round anew.
#ifndef FEDLORA_SERVER_ROUND_SECURE_ROUND_H_
#define FEDLORA_SERVER_ROUND_SECURE_ROUND_H_

#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/secagg/params.h"
#include "common/secagg/protocol.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/accumulate/accumulator.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

class SecureRound {
 public:
  enum class Step { kKeys, kShares, kInput, kConsent, kUnmask, kDone };

  // The instance of attempt `attempt` of `round` (or of a Fed-SB initialisation step) over `cohort`
  // (sorted), whose members each put in `length` values: their change clipped to `change_clip`,
  // times their weight when `weight_cap` > 0. Under client-level DP the clients add the noise,
  // σ/√cohort each.
  struct Plan {
    std::string name;  // "round 3": for the logs
    std::string run_id;
    int64_t round = 0;
    int attempt = 0;
    std::vector<std::string> cohort;
    size_t length = 0;
    double change_clip = 0;
    double weight_cap = 0;
    double noise_multiplier = 0;
    bool unit_norm = false;  // the clients scale their values to norm 1 first
  };
  static absl::StatusOr<std::unique_ptr<SecureRound>> Open(
      const ServerOptions& options, Plan plan,
      std::shared_ptr<const secagg::PeerVerifier> verifier);

  const v1::SecAggConfig& config() const { return config_; }
  const secagg::GraphParams& graph() const { return graph_; }
  Step step() const { return step_; }
  std::string_view StepName() const;
  // Whether the open step waits for `client`: it took the previous step and not this one (for the
  // input step: its upload is the lifecycle's to count).
  bool Waits(const std::string& client) const;
  // `client`'s SECAGG task for the open step (after the keys), when it waits for it.
  std::optional<v1::SecAggStep> StepFor(const std::string& client) const;
  // `client`'s message (`certificate`: the PEM of the certificate its call presented).
  absl::Status Receive(const std::string& client, const std::string& certificate,
                       const v1::SecAggRequest& request);
  // Whether `client` has taken the step `request` is for already: a retry after a lost answer,
  // which is answered OK and changes nothing.
  bool Took(const std::string& client, const v1::SecAggRequest& request) const;
  // The clients that may upload a masked input (the input step's cohort), sorted.
  const std::vector<std::string>& senders() const { return senders_; }
  // The bytes of a masked input.
  int64_t masked_bytes() const;

  // Ends the open step. Ending the input step first adds `inputs`' masked inputs (read back from
  // `store`); ending the unmask step removes the masks and decodes the sum. FAILED_PRECONDITION
  // (or DATA_LOSS for a wrong revealed share) when the round cannot finish: it is retried.
  absl::Status Advance(const std::vector<AcceptedUpdate>& inputs, const StateStore& store);

  // Once done: the decoded sum of the survivors' values, and who they are (sorted).
  const std::vector<double>& sum() const { return sum_; }
  const std::vector<std::string>& survivors() const { return survivors_; }

 private:
  SecureRound(v1::SecAggConfig config, secagg::GraphParams graph, secagg::ServerSession session)
      : config_(std::move(config)), graph_(graph), session_(std::move(session)) {}

  v1::SecAggConfig config_;
  secagg::GraphParams graph_;
  secagg::ServerSession session_;
  Step step_ = Step::kKeys;
  std::vector<std::string> senders_, survivors_;
  std::vector<double> sum_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_SECURE_ROUND_H_
