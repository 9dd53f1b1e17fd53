// What follows each committed version, on a thread of its own so that no client's call waits for
// it: the global model's held-out evaluation (server/evaluator.h), the version's metrics line
// (server/metrics_log.h) and, when the run is done or an operator asks (SIGUSR1), the export
// (server/exporter.h). It works from ledger snapshots the engine hands over at each commit and
// from blobs, which never change, so it takes no lock of the engine's. A failure is retried with
// backoff and, past give_up_after_s, stops the coordinator with what to fix (failed()). After a
// restart it writes what the committed versions still lack.
#ifndef FEDLORA_SERVER_FOLLOW_UP_H_
#define FEDLORA_SERVER_FOLLOW_UP_H_

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/base/env.h"
#include "common/base/log_limiter.h"
#include "server/evaluator.h"
#include "server/metrics_log.h"
#include "server/observe/run_view.h"
#include "server/retry.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

class FollowUp {
 public:
  // `store` is only read for blobs; it, `options` and `env` must outlive this object. `evaluator`
  // may be null (no base model). Starts the thread.
  static absl::StatusOr<std::unique_ptr<FollowUp>> Start(const ServerOptions* options,
                                                         const StateStore* store,
                                                         std::unique_ptr<Evaluator> evaluator,
                                                         common::Env* env, RunView* view);
  ~FollowUp();  // stops the thread, which finishes the step it is in

  // The ledger now holds `ledger->latest()`; `frozen` is Fed-SB's B, A (empty for the others).
  // `run_done`: the run is over, so the result is exported once every line is written.
  void Committed(std::shared_ptr<const Ledger> ledger,
                 std::shared_ptr<const common::Adapter> frozen, bool run_done)
      ABSL_LOCKS_EXCLUDED(mu_);
  // An operator's export of the latest version; FAILED_PRECONDITION before the first round has
  // been committed. The export itself happens on the thread (its outcome is logged).
  absl::Status RequestExport() ABSL_LOCKS_EXCLUDED(mu_);

  // Every committed version has its line, and the export is written if the run is done.
  bool Finished() const ABSL_LOCKS_EXCLUDED(mu_);
  // Not OK once it has given up.
  absl::Status failed() const ABSL_LOCKS_EXCLUDED(mu_);
  // What it does now ("evaluating version 3"), or a failure it retries; empty when idle.
  std::string Describe() const ABSL_LOCKS_EXCLUDED(mu_);
  // Returns once nothing can be done at the Env's present time (for tests, whose clock stands
  // still until they move it).
  void WaitIdle() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  enum class Step { kNone, kMetricsLine, kExport };
  FollowUp(const ServerOptions* options, const StateStore* store,
           std::unique_ptr<Evaluator> evaluator, common::Env* env, MetricsLog log);
  void Loop() ABSL_LOCKS_EXCLUDED(mu_);
  Step NextLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The run is done and its result not exported yet (a run that ends before its first round
  // commits has none).
  bool FinalExportDueLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool RunnableLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IdleLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool WakeLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The metrics line of version `v`, with its held-out scores (the worker's own state: no lock).
  absl::Status WriteLine(const Ledger& ledger, const common::Adapter& frozen, int64_t v);
  absl::Status ExportLatest(const Ledger& ledger, const common::Adapter& frozen);

  const ServerOptions* const options_;
  const StateStore* const store_;
  common::Env* const env_;
  // The worker thread's alone.
  std::unique_ptr<Evaluator> evaluator_;
  MetricsLog log_;
  std::map<int64_t, Evaluator::Scores> scores_;  // of versions whose line is not written yet

  mutable absl::Mutex mu_;
  std::shared_ptr<const Ledger> ledger_ ABSL_GUARDED_BY(mu_);
  std::shared_ptr<const common::Adapter> frozen_ ABSL_GUARDED_BY(mu_);
  bool run_done_ ABSL_GUARDED_BY(mu_) = false;
  bool exported_ ABSL_GUARDED_BY(mu_) = false;          // the final export is written
  int64_t export_requested_ ABSL_GUARDED_BY(mu_) = -1;  // an operator's: the version to export
  int64_t lines_ ABSL_GUARDED_BY(mu_) = 0;              // the version of the last metrics line
  std::string doing_ ABSL_GUARDED_BY(mu_);              // the step in progress
  Retry retry_ ABSL_GUARDED_BY(mu_);
  std::string last_error_ ABSL_GUARDED_BY(mu_);
  absl::Status failure_ ABSL_GUARDED_BY(mu_);
  common::LogLimiter log_limiter_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread thread_;  // last: starts after the members it uses exist
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_FOLLOW_UP_H_
