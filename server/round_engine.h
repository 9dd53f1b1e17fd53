// The round engine: the coordinator's state machine, with no gRPC in it (coordinator_service.h
// adapts it) and no thread of its own (the server's Ticker calls Tick; tests call it after moving
// their clock). Protobuf messages serve as its plain data types. The parts it drives each have a
// file of their own: client_registry (admission), cohort (sampling, quorum), tasks (downloads,
// long polls), uploads (chunks), update_validator, round_close (one commit per round),
// client_dp_rounds, evaluator, exporter, state_store and ledger.
//
// A run: clients join (same base model as the first one); once `min_clients` have joined, round 1
// starts with a cohort sampled from the run's seed. A fed-sb run first initialises from the
// clients' gradient (server/fed_sb_init.h): round 0, in steps that follow the rules of rounds.
// Cohort members get TRAIN tasks and upload their updates, which are validated at the door. The
// round closes when every member has answered, or at its deadline (or when every missing member has
// been silent past its timeout) with a quorum; a round without quorum is retried with a new cohort.
// Closing commits the new version (round_close.h); then, derived from the committed ledger, the
// global model is evaluated, the metrics line is appended and, after the last round, the result is
// exported. A failed commit keeps the round's updates and is retried with backoff; a failed
// evaluation, metrics line or export is redone without aggregating again. Failures that last
// `options.give_up_after_s` stop the engine with an error that says what to fix (failed()). A
// restarted coordinator continues from the last version.
#ifndef FEDLORA_SERVER_ROUND_ENGINE_H_
#define FEDLORA_SERVER_ROUND_ENGINE_H_

#include <chrono>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "common/base/env.h"
#include "common/base/log_limiter.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/client_dp_rounds.h"
#include "server/client_registry.h"
#include "server/evaluator.h"
#include "server/fed_sb_init.h"
#include "server/server_options.h"
#include "server/state_store.h"
#include "server/tasks.h"
#include "server/update_validator.h"
#include "server/uploads.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

class RoundEngine {
 public:
  // Opens the state directory (continuing its run if it has one). Every file write and clock read
  // goes through `env`, which must outlive the engine.
  static absl::StatusOr<std::unique_ptr<RoundEngine>> Create(
      const ServerOptions& options, common::Env* env = common::Env::Default());

  // A join starts a new session of `client` (from `peer`, an address for the logs); calls in an
  // older one are refused from then on (CheckSession).
  absl::StatusOr<v1::JoinResponse> Join(const std::string& client, const v1::JoinRequest& request,
                                        std::string_view peer = "");
  // PERMISSION_DENIED (SUPERSEDED) when `session` (sent with a call from `peer`; empty: not said)
  // is not `client`'s latest: two processes use one identity, or an old one still runs. Logged as
  // a warning naming both peers.
  absl::Status CheckSession(const std::string& client, std::string_view session,
                            std::string_view peer);

  // Long poll: `done` is called exactly once, with a task as soon as there is one for the client,
  // or WAIT after max_wait_ms (by the clock of Tick). It may be called on this thread or on the
  // one calling Tick; never under the engine's lock.
  using TaskCallback = LongPolls::TaskCallback;
  void GetTask(const std::string& client, const v1::GetTaskRequest& request, TaskCallback done);
  // GetTask that waits for its answer; with max_wait_ms 0 it answers at once.
  absl::StatusOr<v1::Task> GetTaskBlocking(const std::string& client,
                                           const v1::GetTaskRequest& request);

  absl::StatusOr<v1::DownloadResponse> Download(const std::string& client,
                                                const v1::DownloadRequest& request);
  absl::StatusOr<v1::UploadResponse> Upload(const std::string& client,
                                            const v1::UploadRequest& request);
  v1::HeartbeatResponse Heartbeat(const std::string& client, const v1::HeartbeatRequest& request);
  v1::StatusResponse GetStatus();
  // The client leaves the run (declining this round's task if it has one): the round stops waiting
  // for it and later cohorts leave it out, until it joins again.
  absl::StatusOr<v1::LeaveResponse> Leave(const std::string& client,
                                          const v1::LeaveRequest& request);
  // Writes the latest version's exports to <state-dir>/export now (operators: SIGUSR1), as the end
  // of the run does; FAILED_PRECONDITION before the first round has completed.
  absl::Status ExportNow();

  // Applies deadlines and client timeouts, retries what failed when its backoff has passed, and
  // answers expired long polls.
  void Tick();
  // The run is over: every round committed and everything derived from them written.
  bool done();
  // Not OK when the engine has given up: a commit or what follows it kept failing (the status says
  // what and what to fix). The daemon exits with it.
  absl::Status failed();
  // Wakes every pending long poll (with WAIT); for shutdown.
  void Shutdown();

 private:
  enum class Phase { kWaitingForClients, kTraining, kDone };
  // A step that failed and is retried with backoff: the round's commit, or what follows commits.
  struct Retry {
    bool pending = false;
    int failures = 0;
    std::chrono::steady_clock::time_point first_failure, next_try;
  };

  RoundEngine(const ServerOptions& options, common::Env* env, StateStore store);
  absl::Status Resume();  // continues the run in the store, if any
  int64_t version() const { return store_.ledger().latest(); }
  // Fed-SB's initialisation is in progress (round 0), at step init_step().
  bool InitialisingLocked() const { return store_.has_ledger() && store_.ledger().initialising(); }
  int init_step() const { return static_cast<int>(store_.ledger().init->steps.size()); }
  // "round N", or "fed-sb initialisation step s of S" during round 0.
  std::string RoundNameLocked() const;
  // The run's modules at its rank, as every update holds them (LoRA-SB modules for fed-sb).
  // The scaling every client trains with (node.cc: the task's lora_alpha / rank); fed-sb's R is
  // decoded onto the frozen factors' scaling, so nothing is checked there.
  // The rank `client` trains: --client-ranks', else the run's.
  int RankOf(const std::string& client) const {
    const auto it = options_.client_ranks.find(client);
    return it == options_.client_ranks.end() ? options_.rank : it->second;
  }
  double TaskScaling() const {
    return method_ == common::Method::kFedSb ? 0 : options_.lora_alpha / options_.rank;
  }
  std::vector<common::ModuleShape> TrainedShapes() const {
    return store_.ledger().Shapes(options_.rank, method_ == common::Method::kFedSb);
  }
  absl::Status InitializeRunLocked(const v1::JoinRequest& first);
  // Starts the round (its next attempt) once its backoff has passed and enough clients are alive;
  // otherwise says what it waits for.
  void MaybeStartRoundLocked();
  // Draws the cohort from `candidates` (the live clients) and starts training.
  void StartRoundLocked(const std::vector<std::string>& candidates);
  // Records what the run waits for (logged when it changes; the WAIT note and the status say it).
  void WaitingLocked(std::string what);
  void EndRunLocked(const std::string& why);
  // Members that delivered their update or declined their task: the round no longer waits for them.
  bool AnsweredLocked(const std::string& client) const;
  bool EveryMemberAnsweredLocked() const;
  // Every member has answered, or the round's time is up: commits the round if the quorum
  // arrived, and otherwise retries it with a new cohort.
  void MaybeCloseRoundLocked();
  void CommitRoundLocked();
  void CommitInitStepLocked();
  // Evaluation, metrics lines and the final export of committed versions that lack them.
  void FollowUpLocked();
  absl::Status FollowUpOnceLocked();
  // Records a failure of `retry`'s step; gives up (failed()) once failures have lasted long enough.
  void FailedLocked(Retry& retry, const absl::Status& status, const std::string& step);
  v1::Task TaskForLocked(const std::string& client, int64_t have_version);
  void CollectReadyLocked(LongPolls::Ready* ready, bool all);
  // What a waiting client's task depends on, but for its own upload (which it does not wait on):
  // phase, round, version, Fed-SB initialisation step, cohort, a commit being retried. While it is
  // unchanged, a poll that got WAIT would get WAIT again.
  using TaskState = std::tuple<Phase, int64_t, int64_t, int, size_t, bool>;
  TaskState TaskStateLocked() const;
  void StartSumsLocked();
  // `sketch`: the shapes of the initialisation step's products, when the upload is one.
  absl::StatusOr<v1::UploadResponse> FinishUpload(
      const std::string& client, const v1::UploadRequest& request, const UpdateValidator& validator,
      const std::optional<std::vector<common::MatrixShape>>& sketch);

  const ServerOptions options_;
  const common::Method method_;
  common::Env* const env_;
  std::mutex mu_;
  common::LogLimiter log_limiter_;  // repeated events (joins, refusals, failures) once per 10 s
  StateStore store_;
  Phase phase_ = Phase::kWaitingForClients;
  absl::Status failure_;  // set once the engine gives up
  ClientRegistry clients_;
  double weight_cap_ = std::numeric_limits<double>::infinity();  // the round's weight cap
  int64_t round_ = 0;  // the round in progress (version() + 1 while training)
  int attempt_ = 0;    // retries of this round without quorum
  std::chrono::steady_clock::time_point next_attempt_;  // a retried round starts no earlier
  std::string waiting_for_;  // while no round is open: what the run waits for
  std::chrono::steady_clock::time_point round_started_;
  std::optional<std::chrono::steady_clock::time_point> run_started_;  // in this process
  std::vector<std::string> cohort_;                                   // sorted
  Uploads uploads_;
  std::vector<std::string> rejected_;            // this round's refused updates, by client
  std::map<std::string, int64_t> late_;          // since the last commit: client → its round
  std::map<std::string, std::string> declined_;  // this round's declined tasks: client → reason
  common::StreamingAverage sums_;                // fedit and fed-sb without client-level DP
  std::vector<common::MatrixD> sketch_sums_;     // round 0: Σ n_k·product_k per module
  double sketch_weight_ = 0;                     // Σ n_k
  UpdateValidator validator_;                    // for the current version
  LongPolls polls_;
  TaskState polled_state_{};              // at the last look at every waiter
  common::Adapter frozen_;                // Fed-SB's shared B, A (R = 0), once the run exists
  std::unique_ptr<Evaluator> evaluator_;  // with options_.base_model_dir
  std::optional<ClientDpRounds> dp_;      // with client-level DP
  Retry commit_retry_;                    // the round is closing: its commit failed
  Retry follow_up_retry_;                 // derived work of committed versions is outstanding
  // Held-out scores of versions without a metrics line.
  std::map<int64_t, Evaluator::Scores> eval_scores_;
  bool exported_ = false;  // the final export is written
  bool stopping_ = false;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_ENGINE_H_
