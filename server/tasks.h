// What a client is sent: the blobs it lacks to reach a version (per method, DESIGN.md "what
// travels"), and the long polls of clients waiting for a task.
#ifndef FEDLORA_SERVER_TASKS_H_
#define FEDLORA_SERVER_TASKS_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/state_store.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

// The ledger's reference to a blob as the wire carries it.
v1::BlobRef ToProto(const BlobRef& blob);

// The blobs that take a client from version `have` (-1: nothing) to `target`: the latest global
// adapter (fedit, lora-fair), every round delta it has not merged, in order (flora), or the frozen
// B, A once and then only the latest R (fed-sb). Empty when have >= target.
std::vector<v1::BlobRef> DownloadsFor(const Ledger& ledger, int64_t have, int64_t target);

// Clients waiting for a task. The engine asks, under its lock, which can be answered now; the
// answers are delivered after it unlocks (a callback may send a reply and must not re-enter).
class LongPolls {
 public:
  using TaskCallback = std::function<void(absl::StatusOr<v1::Task>)>;
  using Ready = std::vector<std::pair<TaskCallback, v1::Task>>;

  void Add(std::string client, int64_t have_version, std::chrono::steady_clock::time_point deadline,
           TaskCallback done);
  // Which waiters Collect answers: those whose deadline has passed (nothing that decides a waiting
  // client's task has changed since the last call), those too whose task is no longer WAIT
  // (something has), or every one.
  enum class Scope { kExpired, kChanged, kAll };
  // Moves the waiters `scope` says into `ready`, each with its task from `task_for`.
  void Collect(const std::function<v1::Task(const std::string&, int64_t)>& task_for,
               std::chrono::steady_clock::time_point now, Scope scope, Ready* ready);
  // Calls every callback in `ready` and empties it.
  static void Deliver(Ready& ready);

 private:
  struct Waiter {
    std::string client;
    int64_t have_version;
    std::chrono::steady_clock::time_point deadline;
    TaskCallback done;
  };
  std::vector<Waiter> waiters_;
  // No waiter's deadline is earlier: Collect(kExpired) before it has nothing to do.
  std::chrono::steady_clock::time_point next_deadline_ =
      std::chrono::steady_clock::time_point::max();
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_TASKS_H_
