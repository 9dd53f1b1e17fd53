// A step that failed and is retried with backoff (0.5 s doubling to 30 s): a round's commit
// (server/round/lifecycle.h), or what follows commits (server/follow_up.h). Failures that have
// lasted options.give_up_after_s give up with an error that says what to fix.
#ifndef FEDLORA_SERVER_RETRY_H_
#define FEDLORA_SERVER_RETRY_H_

#include <chrono>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "common/base/log_limiter.h"
#include "server/server_options.h"

namespace fedlora::server {

class Retry {
 public:
  using TimePoint = std::chrono::steady_clock::time_point;

  bool pending() const { return failures_ > 0; }
  int failures() const { return failures_; }
  bool Due(TimePoint now) const { return now >= next_try_; }
  void Succeeded() { *this = Retry(); }
  // Records a failure of `step` at `now`: logged (once per window through `limiter`) with a hint
  // for the operator, retried after the backoff. Returns the error to stop with once failures have
  // lasted give_up_after_s.
  std::optional<absl::Status> Failed(TimePoint now, const absl::Status& status,
                                     const std::string& step, const ServerOptions& options,
                                     common::LogLimiter& limiter);

  // The wait before the next try of something that failed `failures` times: 0.5 s doubling to
  // 30 s.
  static double BackoffSeconds(int failures);

 private:
  int failures_ = 0;
  TimePoint first_failure_, next_try_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_RETRY_H_
