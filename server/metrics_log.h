// metrics.jsonl in the state directory: one line per closed round (common::MetricsLine: the
// round's record from the ledger and the global model's held-out scores), appended by the
// follow-up (server/follow_up.h) in version order. The file is rewritten atomically, so a reader
// never sees half a line; a restart reads it back and goes on after its last line.
#ifndef FEDLORA_SERVER_METRICS_LOG_H_
#define FEDLORA_SERVER_METRICS_LOG_H_

#include <cstdint>
#include <filesystem>
#include <string>

#include "absl/status/statusor.h"
#include "common/base/env.h"
#include "common/run/records.h"
#include "server/observe/run_view.h"

namespace fedlora::server {

class MetricsLog {
 public:
  // Reads the file if there is one. DATA_LOSS, naming the line and field, for a line that is not a
  // metrics line or versions that are not 1, 2, … up to at most `latest` (the ledger's).
  // Every line read and appended is added to `view`, when there is one.
  static absl::StatusOr<MetricsLog> Open(const std::filesystem::path& file, common::Env* env,
                                         int64_t latest, RunView* view = nullptr);

  // The version of the last line (0 when there is none).
  int64_t version() const { return version_; }
  // Adds the line of the next version; on failure the file and memory stay as they were.
  absl::Status Append(const common::MetricsLine& line);

 private:
  std::filesystem::path file_;
  common::Env* env_ = nullptr;
  RunView* view_ = nullptr;
  std::string text_;  // the file's contents
  int64_t version_ = 0;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_METRICS_LOG_H_
