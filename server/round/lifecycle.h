// A run's rounds, from the first join to the last commit: when a round opens (enough live clients;
// its cohort drawn from the seed; its update gate and accumulator chosen), what it asks of each
// client (TaskFor), when it closes (every member answered, or at its deadline or once every
// missing member is silent, with a quorum; without one it is retried with a new cohort after a
// backoff) and what the close commits (server/round/close.h; a failed commit is retried with
// backoff). Round 0 of a Fed-SB run initialised from the clients' gradient is a sequence of steps
// under the same rules (server/fed_sb_init.h). Each commit is handed to the follow-up (evaluation,
// metrics line, export: server/follow_up.h). No lock of its own: the engine
// (server/round/engine.h) holds its lock around every call.
#ifndef FEDLORA_SERVER_ROUND_LIFECYCLE_H_
#define FEDLORA_SERVER_ROUND_LIFECYCLE_H_

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/env.h"
#include "common/base/log_limiter.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/accumulate/accumulator.h"
#include "server/accumulate/client_dp.h"
#include "server/client_registry.h"
#include "server/follow_up.h"
#include "server/intake/update_gate.h"
#include "server/intake/uploads.h"
#include "server/observe/run_view.h"
#include "server/retry.h"
#include "server/round/secure_round.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

class Lifecycle {
 public:
  enum class Phase { kWaitingForClients, kTraining, kDone };
  using TimePoint = std::chrono::steady_clock::time_point;

  // The parts it drives, all the engine's and guarded by its lock; `dp` is null without
  // client-level DP.
  struct Parts {
    StateStore* store;
    ClientRegistry* clients;
    Uploads* uploads;
    ClientDp* dp;
    FollowUp* follow_up;
    common::LogLimiter* log_limiter;
    RunView* view;
    // Under secure aggregation: checks the certificates and signatures clients relay.
    std::shared_ptr<const secagg::PeerVerifier> verifier;
  };
  Lifecycle(const ServerOptions& options, common::Env* env, Parts parts);

  // Continues the store's run, if it has one.
  absl::Status Resume();
  // Creates the run at its first join (server/round/run_setup.h).
  absl::Status CreateRun(const v1::JoinRequest& first);

  // Opens the round (its next attempt) once its backoff has passed and enough clients are alive;
  // otherwise says what it waits for.
  void MaybeStart();
  // Applies the deadline and client timeouts, retries a failed commit, opens a round.
  void Tick();
  // `client`'s update passed the gate and was accepted; the round closes if it was the last.
  void Accepted(const std::string& client);
  // `client`'s update was refused by the gate (`why`): counted in the round, and the round counts
  // once in the run; at --max-rejections rounds with a refusal, the client is removed from it.
  void Rejected(const std::string& client, absl::string_view why);
  // Under secure aggregation: `client`'s step of the open round's protocol (`certificate`: the PEM
  // its call presented). FAILED_PRECONDITION (STALE_TASK) when no secure round waits for it.
  absl::Status SecAgg(const std::string& client, const std::string& certificate,
                      const v1::SecAggRequest& request);
  // A late update (its round closed or is closing): recorded in the next round's metrics.
  void Late(const std::string& client, int64_t round);
  // `client` leaves the run, declining the task of `round` if it has one.
  void Leave(const std::string& client, int64_t round, const std::string& reason);
  // An operator removes `client` from the run (`reason` starts with kOperatorRemoval): it is
  // removed as --max-rejections removes, and its update of the open round is dropped even if it
  // was accepted.
  void Remove(const std::string& client, const std::string& reason);
  static constexpr char kOperatorRemoval[] = "removed from the run by operator ";
  // While paused (`why`: by whom), no round opens; the one open goes on and closes.
  void Pause(bool paused, const std::string& why);
  bool paused() const { return paused_; }

  v1::Task TaskFor(const std::string& client, int64_t have_version) const;
  // Whether the round still waits for `client`'s answer to its task of `round`.
  bool StillWanted(const std::string& client, int64_t round) const;
  void FillStatus(v1::StatusResponse& status) const;
  RoundView View() const;
  // The gate of the round open (null when none is).
  std::shared_ptr<const UpdateGate> gate() const { return open_.gate; }
  // The blob `sha256` the open round serves `client` besides the ledger's (lora-fair's Ā under
  // secure aggregation, to the second sum's clients while it waits for their keys), or null.
  const std::string* RoundBlob(const std::string& client, const std::string& sha256) const;
  // The rank `client` trains: --client-ranks', else the run's.
  int RankOf(const std::string& client) const;
  // "round N", or "fed-sb initialisation step s of S (product)" during round 0.
  std::string RoundName() const;

  // What a waiting client's task depends on, but for its own upload (which it does not wait on):
  // phase, round, version, Fed-SB initialisation step, cohort, a commit being retried. While it is
  // unchanged, a poll that got WAIT would get WAIT again.
  using TaskState = std::tuple<Phase, int64_t, int64_t, int, size_t, bool, int>;
  TaskState State() const;

  Phase phase() const { return phase_; }
  int64_t round() const { return round_; }
  bool closing() const { return commit_retry_.pending(); }
  const absl::Status& failure() const { return failure_; }

 private:
  // The round (or initialisation step) in progress.
  struct OpenRound {
    int attempt = 0;
    std::vector<std::string> cohort;  // sorted
    TimePoint started;
    common::PerClient rejected;                   // client → its refused updates
    std::map<std::string, std::string> declined;  // client → reason
    std::shared_ptr<const UpdateGate> gate;
    std::unique_ptr<SecureRound> secure;  // under secure aggregation (outlives the accumulator)
    // lora-fair under secure aggregation, once its first sum is done: its instance and accepted
    // masked inputs (what the round records), and Ā for the second sum's clients to download.
    std::unique_ptr<SecureRound> first;
    std::optional<Uploads> first_uploads;
    std::string mean_blob;
    v1::BlobRef mean_ref;
    TimePoint step_started;  // of the secure round's open step
    std::unique_ptr<Accumulator> accumulator;
    bool InCohort(const std::string& client) const;
  };

  int64_t version() const { return store_.ledger().latest(); }
  bool Initialising() const { return store_.has_ledger() && store_.ledger().initialising(); }
  int InitStep() const { return static_cast<int>(store_.ledger().init->steps.size()); }
  void Waiting(std::string what);
  // Draws the cohort from `alive` and opens the round.
  void Open(const std::vector<std::string>& alive);
  // The gate and accumulator of the round being opened; false when the privacy budget ends the run.
  bool ChooseParts(size_t population);
  void EndRun(const std::string& why);
  // The removals recorded in `l` hold in this process too (unless --max-rejections is 0).
  void ReapplyRemovals(const Ledger& l);
  // Counts a rejected update of `client` in the run; at --max-rejections, removes the client.
  // Counts a rejected update of `client` in the round or step `step` (committed_ while it was
  // open), once per step.
  void CountRejection(const std::string& client, int64_t step, absl::string_view why);
  bool Answered(const std::string& client) const;
  bool EveryMemberAnswered() const;
  // Every member has answered, or the round's time is up: commits the round if the quorum
  // arrived, and otherwise retries it with a new cohort.
  void MaybeClose();
  // The secure round's open step is over: the next one opens, or the round commits, or it is
  // retried when the protocol cannot finish (lora-fair's second sum: the round commits
  // uncorrected).
  void AdvanceSecure();
  // lora-fair's first secure sum is done: its second opens over the survivors still in the round
  // (or, when it cannot, the round commits the first's Ā, B̄ uncorrected).
  void OpenCorrection();
  // Whether the open secure round is past its clients' training: a protocol step is open.
  bool InProtocol() const;
  // Forgets `client`'s upload of the open round (not once a secure round has summed it).
  void DropUpload(const std::string& client);
  // Under secure aggregation: whether the open step still waits for `client`.
  bool SecureWaits(const std::string& client) const;
  // The round failed (`why`): retried with a new cohort of the live clients after a backoff.
  void RetryRound(const std::string& why);
  // The secure round of the round being opened, with its gate and accumulator (ChooseParts).
  // False when the privacy budget ends the run.
  absl::StatusOr<bool> ChooseSecureParts(std::optional<std::vector<common::MatrixShape>> sketch,
                                         std::vector<common::ModuleShape> shapes, double weight_cap,
                                         size_t population);
  void Commit();
  void CommitInitStep();
  // The round's participation as its record states it (but for arrived and bytes_up).
  common::Participation Who() const;
  void CommitFailed(const absl::Status& status, const std::string& what);
  void HandOver(bool run_done);  // the committed ledger to the follow-up

  const ServerOptions& options_;
  common::Env* const env_;
  StateStore& store_;
  ClientRegistry& clients_;
  Uploads& uploads_;
  ClientDp* const dp_;
  const std::shared_ptr<const secagg::PeerVerifier> verifier_;
  FollowUp& follow_up_;
  common::LogLimiter& log_limiter_;
  RunView& view_;

  Phase phase_ = Phase::kWaitingForClients;
  int64_t round_ = 0;                     // the round in progress (version() + 1 while training)
  int attempt_ = 0;                       // retries of this round without quorum
  TimePoint next_attempt_;                // a retried round opens no earlier
  std::string waiting_for_;               // while no round is open: what the run waits for
  std::optional<TimePoint> run_started_;  // in this process
  TimePoint first_attempt_;               // of the round in progress
  OpenRound open_;
  std::map<std::string, int64_t> late_;            // since the last commit: client → its round
  std::map<std::string, std::string> removed_;     // since the last commit: client → why
  int64_t committed_ = 0;                          // rounds and init steps committed (this process)
  std::map<std::string, int64_t> struck_;          // client → the last step it was struck in
  Retry commit_retry_;                             // the round is closing: its commit failed
  std::shared_ptr<const common::Adapter> frozen_;  // Fed-SB's B, A (R = 0), once the run has them
  absl::Status failure_;                           // set once it gives up
  bool paused_ = false;                            // by an operator
  std::string paused_why_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_LIFECYCLE_H_
