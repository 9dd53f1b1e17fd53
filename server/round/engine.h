// The round engine: the coordinator's calls, with no gRPC in it (coordinator_service.h adapts it)
// and no thread of its own for rounds (the server's Ticker calls Tick; tests call it after moving
// their clock). Protobuf messages serve as its plain data types. It wires the parts, each in a file
// of its own, and holds the one lock they run under:
//   client_registry   who joined, sessions, liveness          round/lifecycle  where a round opens
//   intake/uploads    chunks spooled to the state store                        and closes
//   intake/update_gate  every check an update passes          round/close      one commit per round
//   accumulate/       what a round does with its updates      tasks            downloads, long
//   polls state_store       blobs and the ledger                    follow_up        evaluation,
//   metrics
//                                                                              line, export (its
//                                                                              own thread)
// A run: clients join (same base model as the first one); once `min_clients` have joined, round 1
// opens with a cohort sampled from the run's seed (a fed-sb run initialised from the clients'
// gradient first runs round 0's steps). Members get TRAIN tasks and upload updates, which the
// gate checks; the round closes when every member has answered, or at its deadline (or once every
// missing member has been silent past its timeout) with a quorum, and is retried with a new cohort
// without one. The close commits the new version; the follow-up then evaluates it, writes its
// metrics line and, after the last round, exports the result, while the next round goes on. A
// failed commit keeps the round's updates and is retried with backoff; failures that last
// `options.give_up_after_s` stop the engine with an error that says what to fix (failed()). A
// restarted coordinator continues from the last version.
#ifndef FEDLORA_SERVER_ROUND_ENGINE_H_
#define FEDLORA_SERVER_ROUND_ENGINE_H_

#include <memory>
#include <string>
#include <string_view>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/base/env.h"
#include "common/base/log_limiter.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/accumulate/client_dp.h"
#include "server/client_registry.h"
#include "server/evaluator.h"
#include "server/follow_up.h"
#include "server/intake/uploads.h"
#include "server/observe/run_view.h"
#include "server/round/lifecycle.h"
#include "server/server_options.h"
#include "server/state_store.h"
#include "server/tasks.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

class RoundEngine {
 public:
  // Opens the state directory (continuing its run if it has one). Every file write and clock read
  // goes through `env`, which must outlive the engine. `evaluator`: the base model's side (tests);
  // null loads options.base_model_dir's, when set.
  static absl::StatusOr<std::unique_ptr<RoundEngine>> Create(
      const ServerOptions& options, common::Env* env = common::Env::Default(),
      std::unique_ptr<Evaluator> evaluator = nullptr);
  ~RoundEngine();

  // A join starts a new session of `client` (from `peer`, an address for the logs); calls in an
  // older one are refused from then on (CheckSession).
  absl::StatusOr<v1::JoinResponse> Join(const std::string& client, const v1::JoinRequest& request,
                                        std::string_view peer = "") ABSL_LOCKS_EXCLUDED(mu_);
  // PERMISSION_DENIED (SUPERSEDED) when `session` (sent with a call from `peer`; empty: not said)
  // is not `client`'s latest: two processes use one identity, or an old one still runs. Logged as
  // a warning naming both peers.
  absl::Status CheckSession(const std::string& client, std::string_view session,
                            std::string_view peer) ABSL_LOCKS_EXCLUDED(mu_);

  // Long poll: `done` is called exactly once, with a task as soon as there is one for the client,
  // or WAIT after max_wait_ms (by the clock of Tick). It may be called on this thread or on the
  // one calling Tick; never under the engine's lock.
  using TaskCallback = LongPolls::TaskCallback;
  void GetTask(const std::string& client, const v1::GetTaskRequest& request, TaskCallback done)
      ABSL_LOCKS_EXCLUDED(mu_);
  // GetTask that waits for its answer; with max_wait_ms 0 it answers at once.
  absl::StatusOr<v1::Task> GetTaskBlocking(const std::string& client,
                                           const v1::GetTaskRequest& request);

  absl::StatusOr<v1::DownloadResponse> Download(const std::string& client,
                                                const v1::DownloadRequest& request)
      ABSL_LOCKS_EXCLUDED(mu_);
  absl::StatusOr<v1::UploadResponse> Upload(const std::string& client,
                                            const v1::UploadRequest& request)
      ABSL_LOCKS_EXCLUDED(mu_);
  v1::HeartbeatResponse Heartbeat(const std::string& client, const v1::HeartbeatRequest& request)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Secure aggregation: `client`'s step of the open round's protocol, with the PEM of the
  // certificate its call presented.
  absl::StatusOr<v1::SecAggResponse> SecAgg(const std::string& client,
                                            const std::string& certificate,
                                            const v1::SecAggRequest& request)
      ABSL_LOCKS_EXCLUDED(mu_);
  v1::StatusResponse GetStatus() ABSL_LOCKS_EXCLUDED(mu_);
  // The client leaves the run (declining this round's task if it has one): the round stops waiting
  // for it and later cohorts leave it out, until it joins again.
  absl::StatusOr<v1::LeaveResponse> Leave(const std::string& client,
                                          const v1::LeaveRequest& request) ABSL_LOCKS_EXCLUDED(mu_);
  // `client` may no longer take part (the operator took it off the allow-list, SIGHUP): it leaves
  // the run, declining its task, its pending upload is dropped, and every waiting long poll is
  // answered so that its session ends at once (its next call is refused by the service).
  void Evict(const std::string& client, const std::string& reason) ABSL_LOCKS_EXCLUDED(mu_);
  // An operator (`by`) removes `client` from the run for `reason` (Lifecycle::Remove); its waiting
  // polls are answered, and its next call is refused. Returns what was done.
  absl::StatusOr<std::string> Remove(const std::string& client, const std::string& by,
                                     const std::string& reason) ABSL_LOCKS_EXCLUDED(mu_);
  // An operator (`by`) pauses the round loop (no round opens until it resumes) or resumes it. Not
  // kept across a restart: a restarted coordinator runs.
  absl::StatusOr<std::string> Pause(bool paused, const std::string& by) ABSL_LOCKS_EXCLUDED(mu_);
  // Has the latest version's exports written to <state-dir>/export (operators: SIGUSR1), as the
  // end of the run does, on the follow-up's thread; FAILED_PRECONDITION before the first round has
  // completed.
  absl::Status ExportNow() { return follow_up_->RequestExport(); }

  // Applies deadlines and client timeouts, retries what failed when its backoff has passed, and
  // answers expired long polls.
  void Tick() ABSL_LOCKS_EXCLUDED(mu_);
  // The run is over: every round committed and everything derived from them written.
  bool done() ABSL_LOCKS_EXCLUDED(mu_);
  // Not OK when the engine has given up: a commit or what follows it kept failing (the status says
  // what and what to fix). The daemon exits with it.
  absl::Status failed() ABSL_LOCKS_EXCLUDED(mu_);
  // Wakes every pending long poll (with WAIT); for shutdown.
  void Shutdown() ABSL_LOCKS_EXCLUDED(mu_);
  // Returns once the follow-up has nothing it can do at the clock's present time (tests).
  void WaitForFollowUp() const { follow_up_->WaitIdle(); }
  // What operators see of the run (server/observe/): the engine counts updates and rounds into
  // it; PublishStatus puts its status there.
  std::shared_ptr<RunView> view() const { return view_; }
  void PublishStatus() ABSL_LOCKS_EXCLUDED(mu_) { view_->Publish(GetStatus(), env_->NowUnixMs()); }

 private:
  RoundEngine(const ServerOptions& options, common::Env* env, StateStore store);
  void CollectReadyLocked(LongPolls::Ready* ready, bool all) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes the upload's last chunk through the gate's Check (outside the lock) and accepts it.
  absl::StatusOr<v1::UploadResponse> FinishUpload(const std::string& client,
                                                  const v1::UploadRequest& request,
                                                  std::shared_ptr<const UpdateGate> gate,
                                                  const Sender& sender) ABSL_LOCKS_EXCLUDED(mu_);
  // Refuses `client`'s update for `verdict`: logs it (once per window per client and kind) and
  // counts it in the round; returns the refusal, or the removal from the run it led to (whose
  // waiters are added to `ready`).
  absl::Status Refuse(const std::string& client, const Verdict& verdict, LongPolls::Ready* ready)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const ServerOptions options_;
  common::Env* const env_;
  const std::shared_ptr<RunView> view_;
  mutable absl::Mutex mu_;
  StateStore store_ ABSL_GUARDED_BY(mu_);
  ClientRegistry clients_ ABSL_GUARDED_BY(mu_);
  Uploads uploads_ ABSL_GUARDED_BY(mu_);
  LongPolls polls_ ABSL_GUARDED_BY(mu_);
  Lifecycle::TaskState polled_state_ ABSL_GUARDED_BY(mu_){};  // at the last look at every waiter
  common::LogLimiter log_limiter_ ABSL_GUARDED_BY(mu_);       // repeated events once per 10 s
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<ClientDp> dp_;  // with client-level DP; used by the lifecycle, under mu_
  std::shared_ptr<const secagg::PeerVerifier> verifier_;  // under secure aggregation
  // Reads blobs of store_ on its own thread; declared after store_, so destroyed before it.
  std::unique_ptr<FollowUp> follow_up_;
  std::unique_ptr<Lifecycle> lifecycle_ ABSL_GUARDED_BY(mu_);
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_ENGINE_H_
