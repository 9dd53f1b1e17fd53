// The round engine: the coordinator's logic, with no gRPC in it (the service in
// coordinator_service.h adapts it). Protobuf messages serve as its plain data types.
//
// A run: clients join (same base model as the first one); once `min_clients` have joined, round 1
// starts with a cohort sampled from the run's seed. Cohort members get TRAIN tasks, upload their
// updates (validated at the door), and the round closes when all have arrived, or at its deadline
// with a quorum; a round without quorum is retried with a new cohort. Closing aggregates the
// updates (in client-id order, so a run repeats exactly), stores the new version's blobs, and
// rewrites the ledger atomically; a restarted coordinator continues from the last version.
#ifndef FEDLORA_SERVER_ROUND_ENGINE_H_
#define FEDLORA_SERVER_ROUND_ENGINE_H_

#include <chrono>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "common/adapter.h"
#include "common/aggregate.h"
#include "common/client_dp.h"
#include "common/privacy_accountant.h"
#include "common/trainer.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;
using Clock = std::chrono::steady_clock;

// The byte ranges of an upload received so far, merged.
class ByteRanges {
 public:
  void AddRange(int64_t begin, int64_t end) {
    auto it = ranges_.upper_bound(begin);
    if (it != ranges_.begin() && std::prev(it)->second >= begin) {
      --it;
      begin = it->first;
      end = std::max(end, it->second);
      it = ranges_.erase(it);
    }
    while (it != ranges_.end() && it->first <= end) {
      end = std::max(end, it->second);
      it = ranges_.erase(it);
    }
    ranges_[begin] = end;
  }
  // Length of the range starting at 0 (0 when there is none).
  int64_t Prefix() const {
    return !ranges_.empty() && ranges_.begin()->first == 0 ? ranges_.begin()->second : 0;
  }

 private:
  std::map<int64_t, int64_t> ranges_;  // begin → end, disjoint and not touching
};

class RoundEngine {
 public:
  // Opens the state directory (continuing its run if it has one) and starts the deadline ticker.
  static absl::StatusOr<std::unique_ptr<RoundEngine>> Create(const ServerOptions& options);
  ~RoundEngine();

  absl::StatusOr<v1::JoinResponse> Join(const std::string& client, const v1::JoinRequest& request);

  // Long poll: `done` is called exactly once, with a task as soon as there is one for the client,
  // or WAIT after max_wait_ms. It may be called on this thread or on the ticker's; never under the
  // engine's lock.
  using TaskCallback = std::function<void(absl::StatusOr<v1::Task>)>;
  void GetTask(const std::string& client, const v1::GetTaskRequest& request, TaskCallback done);
  // Blocking form of GetTask, for tests.
  absl::StatusOr<v1::Task> GetTaskBlocking(const std::string& client,
                                           const v1::GetTaskRequest& request);

  absl::StatusOr<v1::DownloadResponse> Download(const std::string& client,
                                                const v1::DownloadRequest& request);
  // Writes the latest version's exports to <state-dir>/export now (operators: SIGUSR1), as the end
  // of the run does; FailedPrecondition before the first round has completed.
  absl::Status ExportNow();
  absl::StatusOr<v1::UploadResponse> Upload(const std::string& client,
                                            const v1::UploadRequest& request);
  v1::HeartbeatResponse Heartbeat(const std::string& client, const v1::HeartbeatRequest& request);
  v1::StatusResponse GetStatus();
  // The client leaves the run (declining this round's task if it has one): the round stops waiting
  // for it and later cohorts leave it out, until it joins again.
  absl::StatusOr<v1::LeaveResponse> Leave(const std::string& client,
                                          const v1::LeaveRequest& request);

  // Applies deadlines and client timeouts, and answers expired long polls (the ticker calls it
  // every 50 ms).
  void Tick();
  bool done();
  // Wakes every pending long poll (with WAIT) and stops the ticker; for shutdown.
  void Shutdown();

 private:
  struct ClientInfo {
    int64_t num_examples = 0;
    Clock::time_point last_seen;
    int64_t rounds_contributed = 0;
    int64_t bytes_down_this_round = 0;
    std::string left;  // why the client left the run; empty while it takes part
  };
  struct PendingUpload {
    std::string sha256;
    int64_t total_size = 0;
    int64_t received = 0;    // contiguous bytes from 0 spooled to the store's incoming/ file
    ByteRanges ranges;       // every chunk received so far (they may arrive out of order)
    bool verifying = false;  // complete, and being checked outside mu_ (FinishUpload)
    bool accepted = false;
    int64_t num_examples = 0;
    std::string blob;  // the stored update's sha256, once accepted (for audit: named in the round's
                       // metrics)
    v1::TrainMetrics metrics;
    common::Adapter
        adapter;  // decoded, once accepted (flora, lora-fair; fedit and fed-sb fold it into sums_)
  };
  // FedIT and Fed-SB aggregate as updates arrive, so memory does not grow with the cohort: Σ n_k
  // A_k and Σ n_k s_k B_k (fedit), Σ n_k s_k R_k (fed-sb), per module, in double.
  struct RunningSums {
    std::vector<common::MatrixD> a, b, r;
    double weight = 0;
  };
  struct Waiter {
    std::string client;
    int64_t have_version;
    Clock::time_point deadline;
    TaskCallback done;
  };
  enum class Phase { kWaitingForClients, kTraining, kDone };

  explicit RoundEngine(const ServerOptions& options, StateStore store);
  int64_t current_version() const;  // latest version in the ledger
  absl::Status InitializeRunLocked(const v1::JoinRequest& first);
  void StartRoundLocked();
  // Forgets this round's uploads and deletes the partial ones' files from incoming/ (a dropped
  // client's, or one still being verified when the round ended).
  void ClearUploadsLocked();
  // Forgets `client`'s upload of this round, if any, and deletes its file from incoming/.
  void DropUploadLocked(const std::string& client);
  size_t ArrivedLocked() const;  // cohort members whose updates were accepted
  // `client` has delivered its update, or declined its task: the round no longer waits for it.
  bool AnsweredLocked(const std::string& client) const;
  bool EveryMemberAnsweredLocked() const;
  absl::Status CloseRoundLocked(bool at_deadline);
  absl::Status ExportLocked();
  // The task for `client` now (WAIT when there is none).
  v1::Task TaskForLocked(const std::string& client, int64_t have_version);
  std::vector<v1::BlobRef> DownloadsLocked(int64_t have_version, int64_t target_version) const;
  // Checks a complete update against the run (called without mu_: `modules` is the ledger's, copied
  // under it; frozen_ does not change while a round is open).
  absl::StatusOr<common::Adapter> ValidateUpdate(const std::string& origin,
                                                 const nlohmann::json& modules,
                                                 std::string_view bytes) const;
  // The last chunk of `client`'s upload has arrived (marked verifying under mu_): checks its sha256
  // and contents and syncs it without holding mu_, then accepts (folds) or rejects it under mu_.
  absl::StatusOr<v1::UploadResponse> FinishUpload(const std::string& client,
                                                  const v1::UploadRequest& request,
                                                  const nlohmann::json& modules);
  bool streaming() const;  // fedit and fed-sb aggregate into sums_ as updates arrive
  // The global adapter of the latest version (Fed-SB: the frozen B, A with the latest R).
  absl::StatusOr<common::Adapter> GlobalStateLocked() const;
  // Client-level DP: false when this round would take ε past the target (the run ends); otherwise
  // starts the round's clipped sum. q = cohort / population (the clients taking part).
  absl::StatusOr<bool> StartClientDpRoundLocked(size_t population);
  // This round in the privacy history: {q, sigma, steps}, with 2 Gaussian mechanisms for LoRA-FAIR.
  nlohmann::json ClientDpRoundEntry() const;
  // The round's adaptive clipper at C = clip with m = expected clients; INVALID_ARGUMENT when the
  // count's noise leaves nothing of the round's noise multiplier for the update.
  absl::StatusOr<common::AdaptiveClipper> AdaptiveClipperFor(double clip, double expected) const;
  // Releases the round's private aggregate; adds its entry to ledger->client_dp and to `metrics`.
  absl::StatusOr<common::AggregateResult> FinishClientDpRoundLocked(
      std::vector<common::Adapter> updates, Ledger* ledger, nlohmann::json* metrics);
  void FoldLocked(const common::Adapter& update, double weight);
  absl::StatusOr<common::Adapter> SumsToAdapterLocked() const;
  // Moves the waiters that can be answered into `ready` (to be called after unlocking).
  void CollectReadyWaitersLocked(std::vector<std::pair<TaskCallback, v1::Task>>* ready, bool all);
  void Notify(std::vector<std::pair<TaskCallback, v1::Task>>& ready);

  const ServerOptions options_;
  const common::Method method_;
  std::mutex mu_;
  StateStore store_;
  Phase phase_ = Phase::kWaitingForClients;
  std::map<std::string, ClientInfo> clients_;
  int64_t round_ = 0;  // the round in progress (current_version() + 1 while training)
  int attempt_ = 0;    // retries of this round without quorum
  Clock::time_point round_started_;
  std::optional<Clock::time_point>
      run_started_;  // first round start in this process (for elapsed_seconds)
  std::vector<std::string> cohort_;
  std::map<std::string, PendingUpload> uploads_;  // this round's, by client
  std::vector<std::string> rejected_;             // this round's refused updates, by client
  // Updates for a round that had already closed, received since the last metrics line: client →
  // the round the update was for.
  std::map<std::string, int64_t> late_;
  std::map<std::string, std::string> declined_;  // this round's declined tasks: client → reason
  RunningSums sums_;
  std::vector<Waiter> waiters_;
  common::Adapter frozen_;  // Fed-SB's shared B, A (R = 0), once the run exists
  // With options_.base_model_dir: the base model and held-out data, and for FLoRA the base with
  // every completed round's delta merged (what the clients hold).
  std::unique_ptr<common::Model> base_;
  std::vector<common::Example> eval_examples_;
  std::optional<common::LlamaWeights> flora_merged_;
  // Client-level DP (options_.client_dp()): the round's clipped sum over its starting state, the
  // sampling rate, and the noise source.
  std::optional<common::ClientDpRound> dp_round_;
  double dp_sample_rate_ = 0;
  std::optional<common::GaussianNoise> noise_;
  bool stopping_ = false;
  std::condition_variable ticker_cv_;
  std::thread ticker_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_ENGINE_H_
