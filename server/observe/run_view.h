// What operators see of a run, apart from the engine: the Prometheus metrics (/metrics) and the
// live page's data (/api/run) of the coordinator's HTTP listener (server/observe/listener.h).
// The engine publishes its status into it (at most once a second, from its tick) and counts
// updates as they are decided; the follow-up adds each metrics line as it writes it. Readers —
// the listener's threads — take only this object's lock, never the engine's, so a scrape never
// waits for a round and a round never waits for a scrape. Lock order: engine → view.
#ifndef FEDLORA_SERVER_OBSERVE_RUN_VIEW_H_
#define FEDLORA_SERVER_OBSERVE_RUN_VIEW_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/run/records.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::server {

class RunView {
 public:
  // `settings`: the run's options as the page shows them; `client_timeout_s`: past it without a
  // call, a client that takes part counts as silent.
  RunView(nlohmann::json settings, double client_timeout_s);

  // The engine's status (RoundEngine::GetStatus), and the clock it was read at.
  void Publish(v1::StatusResponse status, int64_t now_unix_ms) ABSL_LOCKS_EXCLUDED(mu_);
  // `n` updates aggregated into a committed round; an update refused for `kind` (a label:
  // "too_large", "invalid", "norm_outlier"…): each refused upload counts.
  void CountAccepted(int64_t n) ABSL_LOCKS_EXCLUDED(mu_);
  void CountRejected(std::string_view kind) ABSL_LOCKS_EXCLUDED(mu_);
  // A TLS handshake with the coordinator failed (another CA, an expired certificate, a scanner).
  void CountHandshakeFailure() { handshake_failures_.fetch_add(1, std::memory_order_relaxed); }
  // A round committed `seconds` after its first attempt opened.
  void ObserveRound(double seconds) ABSL_LOCKS_EXCLUDED(mu_);
  // The metrics lines of committed versions, in order (a restart adds those on disk first).
  void AddLine(const common::MetricsLine& line) ABSL_LOCKS_EXCLUDED(mu_);

  // The Prometheus text exposition format (version 0.0.4) of every metric, the process's
  // resident memory and CPU time included. Both readers copy what they need under the lock and
  // format after it: the engine, which counts into the view, never waits for a scrape's text.
  std::string Prometheus() const ABSL_LOCKS_EXCLUDED(mu_);
  // The live page's data: settings, status, a summary per committed round, clients.
  nlohmann::json Page() const ABSL_LOCKS_EXCLUDED(mu_);

  // Upper bounds of the round-duration histogram's buckets, in seconds (+Inf follows).
  static constexpr std::array<double, 10> kRoundBuckets = {1,   5,   15,  30,   60,
                                                           120, 300, 600, 1800, 3600};

  // What the readers format, copied under the lock (the status and last line are shared).
  struct Snapshot {
    std::shared_ptr<const v1::StatusResponse> status;
    int64_t status_unix_ms = 0;
    int64_t accepted = 0;
    std::map<std::string, int64_t, std::less<>> rejected;  // kind → count
    std::array<int64_t, kRoundBuckets.size()> round_buckets{};
    int64_t rounds_observed = 0;
    double round_seconds = 0;
    // Per committed round, what the page shows (not the whole line: a line names every client).
    std::vector<nlohmann::json> rounds;
    std::shared_ptr<const common::MetricsLine> last;
  };

 private:
  Snapshot Take() const ABSL_LOCKS_EXCLUDED(mu_);
  // A client's state for fedlora_clients: "live", "silent", "left" or "removed".
  std::string StateOf(const v1::ClientStatus& c, int64_t now_unix_ms) const;

  const nlohmann::json settings_;
  const double client_timeout_s_;
  std::atomic<int64_t> handshake_failures_ = 0;
  mutable absl::Mutex mu_;
  Snapshot state_ ABSL_GUARDED_BY(mu_);
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_OBSERVE_RUN_VIEW_H_
