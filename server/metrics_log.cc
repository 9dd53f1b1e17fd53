#include "server/metrics_log.h"

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::server {

using common::StrCat;

absl::StatusOr<MetricsLog> MetricsLog::Open(const std::filesystem::path& file, common::Env* env,
                                            int64_t latest, RunView* view) {
  MetricsLog log;
  log.file_ = file;
  log.env_ = env;
  log.view_ = view;
  if (!std::filesystem::exists(file)) return log;
  ASSIGN_OR_RETURN(const std::vector<common::MetricsLine> lines, common::ReadMetrics(file));
  for (const common::MetricsLine& line : lines) {
    const int64_t round = line.record.round;
    if (round != log.version_ + 1 || round > latest) {
      return absl::DataLossError(
          StrCat(file.string(), " line ", log.version_ + 1, ": round ", round, " where round ",
                 log.version_ + 1, " was expected (the ledger holds ", latest,
                 "); the file is derived from the ledger: remove it to have it written again"));
    }
    log.text_ += line.ToJson().dump() + "\n";
    log.version_ = round;
    if (view) view->AddLine(line);
  }
  return log;
}

absl::Status MetricsLog::Append(const common::MetricsLine& line) {
  if (line.record.round != version_ + 1) {
    return absl::InternalError(
        StrCat("metrics line of round ", line.record.round, " after round ", version_));
  }
  std::string text = text_ + line.ToJson().dump() + "\n";
  RETURN_IF_ERROR(common::WriteFileAtomically(file_, text, env_));
  text_ = std::move(text);
  version_ = line.record.round;
  if (view_) view_->AddLine(line);
  return absl::OkStatus();
}

}  // namespace fedlora::server
