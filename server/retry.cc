#include "server/retry.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "common/base/strings.h"
#include "server/state_store.h"

namespace fedlora::server {

double Retry::BackoffSeconds(int failures) {
  return std::min(0.5 * std::pow(2.0, failures - 1), 30.0);
}

std::optional<absl::Status> Retry::Failed(TimePoint now, const absl::Status& status,
                                          const std::string& step, const ServerOptions& options,
                                          common::LogLimiter& limiter) {
  using Seconds = std::chrono::duration<double>;
  if (failures_ == 0) first_failure_ = now;
  ++failures_;
  const double backoff = BackoffSeconds(failures_);
  next_try_ = now + std::chrono::duration_cast<TimePoint::duration>(Seconds(backoff));
  const double failing_s = Seconds(now - first_failure_).count();
  const std::string hint = StorageHint(status, options.state_dir);
  if (failing_s >= options.give_up_after_s) {
    absl::Status failure(
        status.code(),
        common::StrCat(step, " has failed for ", static_cast<int64_t>(failing_s), " s (", failures_,
                       " attempts): ", status.message(), "; ", hint,
                       ", then restart the coordinator on the same state directory: it continues "
                       "from the last committed round"));
    spdlog::critical("giving up: {}", failure.message());
    return failure;
  }
  if (std::string repeated; limiter.Allow("failed " + step, now, &repeated))
    spdlog::error("{} failed: {}; {}; retrying in {:.1f} s (attempt {}){}", step, status.message(),
                  hint, backoff, failures_, repeated);
  return std::nullopt;
}

}  // namespace fedlora::server
