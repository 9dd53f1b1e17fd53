#include "server/follow_up.h"

#include <spdlog/spdlog.h>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "server/exporter.h"

namespace fedlora::server {

using common::StrCat;

absl::StatusOr<std::unique_ptr<FollowUp>> FollowUp::Start(const ServerOptions* options,
                                                          const StateStore* store,
                                                          std::unique_ptr<Evaluator> evaluator,
                                                          common::Env* env, RunView* view) {
  const int64_t latest = store->has_ledger() ? store->ledger().latest() : 0;
  ASSIGN_OR_RETURN(MetricsLog log, MetricsLog::Open(store->dir() / "metrics.jsonl", env,
                                                    std::max<int64_t>(latest, 0), view));
  return std::unique_ptr<FollowUp>(
      new FollowUp(options, store, std::move(evaluator), env, std::move(log)));
}

FollowUp::FollowUp(const ServerOptions* options, const StateStore* store,
                   std::unique_ptr<Evaluator> evaluator, common::Env* env, MetricsLog log)
    : options_(options),
      store_(store),
      env_(env),
      evaluator_(std::move(evaluator)),
      log_(std::move(log)),
      lines_(log_.version()),
      thread_([this] { Loop(); }) {}

FollowUp::~FollowUp() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void FollowUp::Committed(std::shared_ptr<const Ledger> ledger,
                         std::shared_ptr<const common::Adapter> frozen, bool run_done) {
  absl::MutexLock lock(&mu_);
  ledger_ = std::move(ledger);
  frozen_ = std::move(frozen);
  run_done_ = run_done;
}

absl::Status FollowUp::RequestExport() {
  absl::MutexLock lock(&mu_);
  if (ledger_ == nullptr || ledger_->latest() < 1) {
    return absl::FailedPreconditionError(
        "no round has completed yet, so there is no global state to export");
  }
  export_requested_ = ledger_->latest();
  return absl::OkStatus();
}

FollowUp::Step FollowUp::NextLocked() const {
  if (ledger_ == nullptr || !failure_.ok()) return Step::kNone;
  if (lines_ < ledger_->latest()) return Step::kMetricsLine;
  if (FinalExportDueLocked() || export_requested_ >= 0) return Step::kExport;
  return Step::kNone;
}

bool FollowUp::FinalExportDueLocked() const {
  return run_done_ && !exported_ && ledger_->latest() >= 1;
}

bool FollowUp::RunnableLocked() const {
  return NextLocked() != Step::kNone && (!retry_.pending() || retry_.Due(env_->Now()));
}

bool FollowUp::IdleLocked() const { return doing_.empty() && !RunnableLocked(); }

bool FollowUp::Finished() const {
  absl::MutexLock lock(&mu_);
  return ledger_ != nullptr && lines_ >= ledger_->latest() && !FinalExportDueLocked();
}

absl::Status FollowUp::failed() const {
  absl::MutexLock lock(&mu_);
  return failure_;
}

std::string FollowUp::Describe() const {
  absl::MutexLock lock(&mu_);
  if (!doing_.empty()) return doing_;
  if (retry_.pending()) return StrCat("retrying after: ", last_error_);
  return "";
}

void FollowUp::WaitIdle() const {
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(this, &FollowUp::IdleLocked));
}

bool FollowUp::WakeLocked() const { return stop_ || RunnableLocked(); }

void FollowUp::Loop() {
  mu_.Lock();
  while (!stop_) {
    // Work comes with Committed and RequestExport; a retry's time comes with the clock, which is
    // looked at every 50 ms.
    mu_.AwaitWithTimeout(absl::Condition(this, &FollowUp::WakeLocked), absl::Milliseconds(50));
    if (stop_ || !RunnableLocked()) continue;
    const Step step = NextLocked();
    const std::shared_ptr<const Ledger> ledger = ledger_;
    const std::shared_ptr<const common::Adapter> frozen = frozen_;
    const bool final_state = run_done_;  // this snapshot is the run's last
    const int64_t version = step == Step::kMetricsLine ? lines_ + 1 : ledger->latest();
    doing_ =
        StrCat(step == Step::kMetricsLine ? "evaluating version " : "exporting version ", version);
    mu_.Unlock();
    const common::Adapter none;
    const absl::Status status = step == Step::kMetricsLine
                                    ? WriteLine(*ledger, frozen ? *frozen : none, version)
                                    : ExportLatest(*ledger, frozen ? *frozen : none);
    mu_.Lock();
    const std::string what = doing_;
    doing_.clear();
    if (status.ok()) {
      retry_.Succeeded();
      if (step == Step::kMetricsLine) {
        lines_ = version;
      } else {
        exported_ = exported_ || final_state;
        if (export_requested_ <= version) export_requested_ = -1;
      }
      continue;
    }
    last_error_ = StrCat(what, ": ", status.message());
    if (std::optional<absl::Status> give_up = retry_.Failed(
            env_->Now(), status,
            StrCat(what,
                   " (what follows a committed round: the round itself is committed and is "
                   "not aggregated again)"),
            *options_, log_limiter_))
      failure_ = *give_up;
  }
  mu_.Unlock();
}

absl::Status FollowUp::WriteLine(const Ledger& ledger, const common::Adapter& frozen, int64_t v) {
  common::MetricsLine line{*ledger.at(v).record, std::nullopt, std::nullopt, {}};
  if (evaluator_) {
    auto it = scores_.find(v);
    if (it == scores_.end()) {
      spdlog::info("round {}: evaluating the global model", v);
      ASSIGN_OR_RETURN(common::Adapter global, AdapterAt(ledger, *store_, v, frozen));
      ASSIGN_OR_RETURN(std::optional<Evaluator::Scores> scores,
                       evaluator_->Evaluate(ledger, *store_, v, global));
      if (scores) {
        it = scores_.emplace(v, *scores).first;
        spdlog::info(
            "round {}: held-out loss of the global model {:.6f}{}", v, scores->loss,
            scores->accuracy ? fmt::format(", accuracy {:.4f}", *scores->accuracy) : std::string());
      }
    }
    if (it != scores_.end()) {
      line.eval_loss = it->second.loss;
      line.eval_accuracy = it->second.accuracy;
      line.eval_accuracy_by_task = it->second.accuracy_by_task;
    }
  }
  RETURN_IF_ERROR(log_.Append(line));
  scores_.erase(v);
  return absl::OkStatus();
}

absl::Status FollowUp::ExportLatest(const Ledger& ledger, const common::Adapter& frozen) {
  return Export(ledger, *store_, *options_, frozen, evaluator_.get());
}

}  // namespace fedlora::server
