// RoundEngine, continued: a round's life — its start, its close (commit or retry), what follows a
// commit, the retries of failed steps and the ticks that drive deadlines. round_engine.cc has the
// calls clients make.
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "server/cohort.h"
#include "server/exporter.h"
#include "server/round_close.h"
#include "server/round_engine.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;
using common::StrCat;
using Seconds = std::chrono::duration<double>;

// The wait before the next try of something that failed `failures` times: 0.5 s doubling to 30 s.
double BackoffSeconds(int failures) { return std::min(0.5 * std::pow(2.0, failures - 1), 30.0); }

std::chrono::steady_clock::duration ToDuration(double seconds) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(Seconds(seconds));
}

}  // namespace

void RoundEngine::StartSumsLocked() {
  if (InitialisingLocked()) {
    sketch_sums_.clear();
    for (const common::MatrixShape& s : InitProductShapes(store_.ledger(), init_step()))
      sketch_sums_.push_back(common::MatrixD::Zero(s.rows, s.cols));
    sketch_weight_ = 0;
    return;
  }
  if (dp_ || (method_ != Method::kFedIt && method_ != Method::kFedSb)) return;
  sums_ = common::StreamingAverage(method_, TrainedShapes(), &frozen_);
}

void RoundEngine::WaitingLocked(std::string what) {
  if (what != waiting_for_) spdlog::info("{}", what);
  waiting_for_ = std::move(what);
}

void RoundEngine::MaybeStartRoundLocked() {
  if (phase_ != Phase::kWaitingForClients || !store_.has_ledger() || !failure_.ok()) return;
  const auto now = env_->Now();
  const std::vector<std::string> taking_part = clients_.TakingPart();
  if (taking_part.empty() && run_started_)
    return EndRunLocked(StrCat("round ", round_, ": every client has left the run"));
  if (now < next_attempt_) return;  // the retry's backoff (WaitingLocked said so)
  // The live clients: taking part and heard from within the client timeout. A silent one is left
  // out of cohorts until it calls again (a heartbeat, a poll or a join).
  std::vector<std::string> alive, silent;
  for (const std::string& id : taking_part) {
    (clients_.Silent(id, now, Seconds(options_.client_timeout_s)) ? silent : alive).push_back(id);
  }
  // Before the first round, min_clients must have joined; after it, clients that left the run
  // are not waited for, silent ones are.
  const size_t needed = run_started_ ? std::min<size_t>(options_.min_clients, taking_part.size())
                                     : static_cast<size_t>(options_.min_clients);
  if (!run_started_ && clients_.size() < needed) {
    return WaitingLocked(
        StrCat("waiting for ", needed, " clients to join, ", clients_.size(), " joined"));
  }
  if (alive.size() < needed) {
    return WaitingLocked(StrCat(RoundNameLocked(), " waits for ", needed, " live clients (",
                                alive.size(), " alive; silent past the ", options_.client_timeout_s,
                                " s timeout: ", fmt::format("{}", fmt::join(silent, ",")), ")"));
  }
  waiting_for_.clear();
  StartRoundLocked(alive);
}

void RoundEngine::StartRoundLocked(const std::vector<std::string>& ids) {
  cohort_ =
      SampleCohort(ids, options_.seed, round_, attempt_, options_.fraction, options_.min_cohort);
  uploads_.Clear(round_);
  rejected_.clear();
  declined_.clear();
  clients_.NewRound();
  if (dp_) {
    const ClientDpState& state = *store_.ledger().client_dp;
    absl::StatusOr<bool> started = [&]() -> absl::StatusOr<bool> {
      if (InitialisingLocked())
        return dp_->StartSketchStep(state, init_step(), cohort_.size(), ids.size());
      ASSIGN_OR_RETURN(Adapter start, AdapterAt(store_, version(), frozen_));
      return dp_->Start(state, round_, cohort_.size(), ids.size(), std::move(start));
    }();
    if (!started.ok()) {
      return EndRunLocked(StrCat(RoundNameLocked(), " cannot start: ", started.status().message()));
    }
    if (!*started) {
      return EndRunLocked(InitialisingLocked()
                              ? "the privacy budget does not cover fed-sb's initialisation"
                              : "the privacy budget allows no further round");
    }
  }
  std::vector<int64_t> joined;
  for (const std::string& id : cohort_) joined.push_back(clients_.Find(id)->num_examples);
  weight_cap_ = WeightCap(joined, options_.max_client_weight);
  StartSumsLocked();
  round_started_ = env_->Now();
  if (!run_started_) run_started_ = round_started_;
  phase_ = Phase::kTraining;
  spdlog::info("{}{}: cohort of {} of {} clients: {}", RoundNameLocked(),
               attempt_ ? StrCat(" (attempt ", attempt_ + 1, ")") : "", cohort_.size(), ids.size(),
               fmt::join(cohort_, ","));
}

void RoundEngine::EndRunLocked(const std::string& why) {
  spdlog::warn("{}", why);
  phase_ = Phase::kDone;
  cohort_.clear();
  spdlog::info("run {} ended at version {} of {} rounds", store_.ledger().run_id, version(),
               options_.rounds);
  follow_up_retry_.pending = true;
  FollowUpLocked();
}

void RoundEngine::MaybeCloseRoundLocked() {
  const size_t arrived = uploads_.ArrivedCount();
  // Members that declined their task are not waited for, and not counted in the quorum.
  const size_t quorum = QuorumOf(options_.quorum, cohort_.size() - declined_.size());
  if (arrived < quorum) {
    // Retried with a new cohort of the live clients, after a backoff (0.5 s doubling to 30 s), so
    // a round that cannot reach its quorum does not retrain the live clients in a loop.
    ++attempt_;
    const double backoff = BackoffSeconds(attempt_);
    next_attempt_ = env_->Now() + ToDuration(backoff);
    spdlog::warn(
        "{}: {} of {} updates arrived, quorum is {}; retrying in {:.1f} s with a new cohort of "
        "the live clients",
        RoundNameLocked(), arrived, cohort_.size(), quorum, backoff);
    uploads_.Clear(round_);
    cohort_.clear();
    if (dp_) dp_->Reset();
    phase_ = Phase::kWaitingForClients;
    WaitingLocked(StrCat(RoundNameLocked(), " is retried (attempt ", attempt_ + 1, ") after ",
                         backoff, " s"));
    MaybeStartRoundLocked();
    return;
  }
  CommitRoundLocked();
}

void RoundEngine::CommitInitStepLocked() {
  const FedSbInit& init = *store_.ledger().init;
  const int step = init_step();
  const std::string name = RoundNameLocked();
  const std::vector<std::string> arrived = uploads_.ArrivedIds();
  nlohmann::json up = nlohmann::json::object(), down = nlohmann::json::object();
  for (const std::string& id : arrived) up[id] = uploads_.all().at(id).total_size;
  for (const std::string& id : cohort_) down[id] = clients_.Find(id)->bytes_down_this_round;
  nlohmann::json record = {{"step", step + 1},
                           {"steps", init.total_steps()},
                           {"product", common::SketchStepName(InitStepKind(init, step))},
                           {"attempt", attempt_ + 1},
                           {"cohort", cohort_},
                           {"arrived", arrived},
                           {"declined", declined_},
                           {"rejected", rejected_},
                           {"bytes_up", up},
                           {"bytes_down", down},
                           {"elapsed_seconds", Seconds(env_->Now() - *run_started_).count()}};
  // Under client-level DP the step releases the noisy sum of unit-norm answers (ClientDpRounds).
  absl::StatusOr<Adapter> frozen = [&]() -> absl::StatusOr<Adapter> {
    if (!dp_) return CommitInitStep(store_, options_.rank, sketch_sums_, sketch_weight_, record);
    ClientDpState state = *store_.ledger().client_dp;
    nlohmann::json metrics;
    ASSIGN_OR_RETURN(std::vector<common::MatrixD> noisy,
                     dp_->NoiseSketchStep(sketch_sums_, cohort_.size(), &state, &metrics));
    record["client_dp"] = std::move(metrics);
    return CommitInitStep(store_, options_.rank, noisy, 1.0, record, &state);
  }();
  if (!frozen.ok()) {
    FailedLocked(commit_retry_, frozen.status(),
                 StrCat("committing ", name, " (its ", arrived.size(),
                        " accepted answers are kept, and the step is committed once the write "
                        "succeeds)"));
    return;
  }
  commit_retry_ = Retry{};
  uploads_.Clear(round_);
  late_.clear();
  attempt_ = 0;
  phase_ = Phase::kWaitingForClients;
  spdlog::info("{} closed: {} of {} answers", name, arrived.size(), cohort_.size());
  if (frozen->num_modules() > 0) {
    frozen_ = *std::move(frozen);
    validator_ = UpdateValidator(method_, TrainedShapes(), frozen_, TaskScaling());
    round_ = 1;
    double r0 = 0;
    for (size_t i = 0; i < frozen_.num_modules(); ++i) r0 += frozen_.R(i).squaredNorm();
    spdlog::info(
        "fed-sb initialised from the clients' gradient: version 0 holds B, A and R0 (‖R0‖_F = "
        "{:.6g} over {} modules)",
        std::sqrt(r0), frozen_.num_modules());
  }
  MaybeStartRoundLocked();
}

void RoundEngine::CommitRoundLocked() {
  if (InitialisingLocked()) return CommitInitStepLocked();
  RoundFacts facts{round_, attempt_, cohort_, rejected_, declined_, late_, {}, 0.0};
  for (const std::string& id : cohort_)
    facts.bytes_down[id] = clients_.Find(id)->bytes_down_this_round;
  facts.elapsed_seconds = Seconds(env_->Now() - *run_started_).count();
  const absl::StatusOr<nlohmann::json> record =
      CloseRound(facts, {&options_, &store_, &uploads_, &sums_, dp_ ? &*dp_ : nullptr});
  if (!record.ok()) {
    FailedLocked(commit_retry_, record.status(),
                 StrCat("committing round ", round_, " (its ", uploads_.ArrivedCount(),
                        " accepted updates are kept, and the round is committed once the "
                        "write succeeds)"));
    return;
  }
  if (commit_retry_.pending)
    spdlog::info("round {}: committed after {} failed attempts", round_, commit_retry_.failures);
  commit_retry_ = Retry{};
  // The round is done: everything below is in memory or derived from the ledger.
  const std::vector<std::string> arrived = uploads_.ArrivedIds();
  for (const std::string& id : arrived) clients_.Find(id)->rounds_contributed++;
  uploads_.Clear(round_);
  late_.clear();
  if (dp_) {
    dp_->Reset();
    const nlohmann::json& dp = (*record)["client_dp"];
    spdlog::info(
        "round {}: client-level DP spent epsilon {:.4f} at delta {} (order {}; q {:.4g}, noise "
        "multiplier {}, clip {:.6g}, next clip {:.6g})",
        round_, dp["epsilon"].get<double>(), options_.dp_delta, dp["order"].dump(),
        dp["sample_rate"].get<double>(), options_.dp_noise_multiplier, dp["clip"].get<double>(),
        dp["next_clip"].get<double>());
  }
  if (record->contains("dp_epsilon"))
    spdlog::info("round {}: DP-SGD epsilon spent by clients: {}", round_,
                 (*record)["dp_epsilon"].dump());
  const std::vector<std::string> dropped = (*record)["dropped"];
  spdlog::info(
      "round {} closed: {} of {} updates{}; mean loss {:.6g} -> {:.6g}; aggregated in {:.3f} s; "
      "version {}",
      round_, arrived.size(), cohort_.size(),
      dropped.empty() ? "" : fmt::format(" (dropped: {})", fmt::join(dropped, ",")),
      (*record)["mean_loss_before"].get<double>(), (*record)["mean_train_loss"].get<double>(),
      (*record)["aggregation_seconds"].get<double>(), round_);
  if (round_ >= options_.rounds) {
    phase_ = Phase::kDone;
    cohort_.clear();
    spdlog::info("run {} done after {} rounds", store_.ledger().run_id, options_.rounds);
  } else {
    ++round_;
    attempt_ = 0;
    phase_ = Phase::kWaitingForClients;
    MaybeStartRoundLocked();
  }
  follow_up_retry_.pending = true;
  FollowUpLocked();
}

void RoundEngine::FollowUpLocked() {
  if (!follow_up_retry_.pending || !failure_.ok()) return;
  const absl::Status status = FollowUpOnceLocked();
  if (status.ok()) {
    follow_up_retry_ = Retry{};
    return;
  }
  FailedLocked(follow_up_retry_, status,
               "writing what follows a committed round (evaluation, metrics line, export; the "
               "round itself is committed and is not aggregated again)");
}

absl::Status RoundEngine::FollowUpOnceLocked() {
  for (int64_t v = store_.metrics_version() + 1; v <= version(); ++v) {
    nlohmann::json line = store_.ledger().at(v).record;
    if (evaluator_) {
      auto it = eval_scores_.find(v);
      if (it == eval_scores_.end()) {
        ASSIGN_OR_RETURN(Adapter global, AdapterAt(store_, v, frozen_));
        ASSIGN_OR_RETURN(std::optional<Evaluator::Scores> scores,
                         evaluator_->Evaluate(store_, v, global));
        if (scores) {
          it = eval_scores_.emplace(v, *scores).first;
          spdlog::info("round {}: held-out loss of the global model {:.6f}{}", v, scores->loss,
                       scores->accuracy ? fmt::format(", accuracy {:.4f}", *scores->accuracy)
                                        : std::string());
        }
      }
      if (it != eval_scores_.end()) {
        line["eval_loss"] = it->second.loss;
        if (it->second.accuracy) line["eval_accuracy"] = *it->second.accuracy;
        if (!it->second.accuracy_by_task.empty())
          line["eval_accuracy_by_task"] = it->second.accuracy_by_task;
      }
    }
    RETURN_IF_ERROR(store_.AppendMetrics(v, line));
    eval_scores_.erase(v);
  }
  if (phase_ == Phase::kDone && version() >= 1 && !exported_) {
    RETURN_IF_ERROR(Export(store_, options_, frozen_, evaluator_.get()));
    exported_ = true;
  }
  return absl::OkStatus();
}

void RoundEngine::FailedLocked(Retry& retry, const absl::Status& status, const std::string& step) {
  const auto now = env_->Now();
  if (retry.failures == 0) retry.first_failure = now;
  retry.pending = true;
  ++retry.failures;
  const double backoff = BackoffSeconds(retry.failures);
  retry.next_try = now + ToDuration(backoff);
  const double failing_s = Seconds(now - retry.first_failure).count();
  const std::string hint = StorageHint(status, options_.state_dir);
  if (failing_s >= options_.give_up_after_s) {
    failure_ = absl::Status(
        status.code(), StrCat(step, " has failed for ", static_cast<int64_t>(failing_s), " s (",
                              retry.failures, " attempts): ", status.message(), "; ", hint,
                              ", then restart the coordinator on the same state directory: it "
                              "continues from the last committed round"));
    spdlog::critical("giving up: {}", failure_.message());
    return;
  }
  if (std::string repeated; log_limiter_.Allow("failed " + step, now, &repeated))
    spdlog::error("{} failed: {}; {}; retrying in {:.1f} s (attempt {}){}", step, status.message(),
                  hint, backoff, retry.failures, repeated);
}

void RoundEngine::Tick() {
  LongPolls::Ready ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto now = env_->Now();
    if (failure_.ok() && commit_retry_.pending) {
      if (now >= commit_retry_.next_try) CommitRoundLocked();
    } else if (failure_.ok() && phase_ == Phase::kTraining) {
      const bool deadline = now - round_started_ >= Seconds(options_.round_deadline_s);
      // Every member that has not answered is silent past the timeout: waiting cannot help.
      const bool all_silent =
          std::all_of(cohort_.begin(), cohort_.end(), [&](const std::string& id) {
            return AnsweredLocked(id) ||
                   clients_.Silent(id, now, Seconds(options_.client_timeout_s));
          });
      // An update whose last chunk has arrived is not cut off while it is checked (a fraction of a
      // second per 100 MB): the round closes at the next tick after.
      if ((deadline || all_silent) && !uploads_.AnyVerifying()) MaybeCloseRoundLocked();
    }
    MaybeStartRoundLocked();
    if (follow_up_retry_.pending && now >= follow_up_retry_.next_try) FollowUpLocked();
    CollectReadyLocked(&ready, false);
  }
  LongPolls::Deliver(ready);
}

absl::Status RoundEngine::ExportNow() {
  std::lock_guard<std::mutex> lock(mu_);
  if (version() < 1) {
    return absl::FailedPreconditionError(
        "no round has completed yet, so there is no global state to export");
  }
  return Export(store_, options_, frozen_, evaluator_.get());
}

}  // namespace fedlora::server
