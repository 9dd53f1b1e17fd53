#include "server/round/lifecycle.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/net/wire.h"
#include "common/tensor/linalg.h"
#include "common/tensor/peft.h"
#include "server/accumulate/every_factor.h"
#include "server/accumulate/median_norm_bound.h"
#include "server/accumulate/secure_sum.h"
#include "server/accumulate/sketch_sum.h"
#include "server/accumulate/weighted_mean.h"
#include "server/cohort.h"
#include "server/errors.h"
#include "server/exporter.h"
#include "server/fed_sb_init.h"
#include "server/round/close.h"
#include "server/round/run_setup.h"
#include "server/tasks.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;
using common::StrCat;
using Seconds = std::chrono::duration<double>;

std::chrono::steady_clock::duration ToDuration(double seconds) {
  return std::chrono::duration_cast<std::chrono::steady_clock::duration>(Seconds(seconds));
}

}  // namespace

Lifecycle::Lifecycle(const ServerOptions& options, common::Env* env, Parts parts)
    : options_(options),
      env_(env),
      store_(*parts.store),
      clients_(*parts.clients),
      uploads_(*parts.uploads),
      dp_(parts.dp),
      verifier_(std::move(parts.verifier)),
      follow_up_(*parts.follow_up),
      log_limiter_(*parts.log_limiter),
      view_(*parts.view),
      frozen_(std::make_shared<Adapter>()) {}

bool Lifecycle::OpenRound::InCohort(const std::string& client) const {
  return std::binary_search(cohort.begin(), cohort.end(), client);
}

int Lifecycle::RankOf(const std::string& client) const {
  const auto it = options_.client_ranks.find(client);
  return it == options_.client_ranks.end() ? options_.rank : it->second;
}

absl::Status Lifecycle::Resume() {
  if (!store_.has_ledger()) {
    spdlog::info("new {} run in {}: waiting for {} clients", MethodName(options_.method),
                 options_.state_dir, options_.min_clients);
    return absl::OkStatus();
  }
  const Ledger& l = store_.ledger();
  if (l.method != options_.method) {
    return absl::FailedPreconditionError(StrCat("state directory ", options_.state_dir, " holds a ",
                                                MethodName(l.method), " run but method is ",
                                                MethodName(options_.method),
                                                "; use another state_dir for a new run"));
  }
  if (l.versions.size() > 1 && l.client_dp.has_value() != options_.client_dp()) {
    return absl::FailedPreconditionError(
        StrCat("state directory ", options_.state_dir,
               l.client_dp ? " holds a run with" : " holds a run without",
               " client-level DP; continue it with the same dp settings or use another state_dir"));
  }
  if (!options_.base_model_sha256.empty() && !options_.base_model_dir.empty() &&
      l.base_model_sha256 != options_.base_model_sha256) {
    return absl::FailedPreconditionError(
        StrCat("state directory ", options_.state_dir, " holds a run on base model ",
               l.base_model_sha256, " but base_model_dir is ", options_.base_model_sha256));
  }
  if (l.client_dp.has_value() != options_.client_dp()) {  // only at version 0 (checked above)
    Ledger ledger = l;
    ledger.client_dp.reset();
    if (options_.client_dp()) ledger.client_dp = ClientDpState{options_.dp_clip, {}};
    RETURN_IF_ERROR(store_.SaveLedger(ledger));
  }
  ReapplyRemovals(l);
  if (Initialising()) {
    round_ = 0;
    spdlog::info("continuing run {} from {}: fed-sb initialisation at step {} of {}", l.run_id,
                 options_.state_dir, InitStep() + 1, l.init->total_steps());
    return absl::OkStatus();
  }
  if (options_.method == Method::kFedSb) {
    ASSIGN_OR_RETURN(std::string bytes, store_.ReadWholeBlob(l.at(0).blobs.at(0).sha256));
    ASSIGN_OR_RETURN(Adapter frozen, common::DecodeAdapter(bytes, "frozen blob"));
    frozen_ = std::make_shared<const Adapter>(std::move(frozen));
  }
  round_ = version() + 1;
  if (version() >= options_.rounds) phase_ = Phase::kDone;
  spdlog::info("continuing run {} from {}: version {} of {} rounds", l.run_id, options_.state_dir,
               version(), options_.rounds);
  // What follows the committed rounds may be missing (a failure, or a kill, after a commit); the
  // final export is redone in any case.
  HandOver(phase_ == Phase::kDone);
  return absl::OkStatus();
}

absl::Status Lifecycle::CreateRun(const v1::JoinRequest& first) {
  ASSIGN_OR_RETURN(frozen_, server::CreateRun(options_, first, store_));
  round_ = Initialising() ? 0 : 1;
  return absl::OkStatus();
}

void Lifecycle::HandOver(bool run_done) {
  // Also before a first version (a Fed-SB run that ends in its initialisation): the follow-up then
  // knows the run is done, with nothing to evaluate or export.
  follow_up_.Committed(store_.snapshot(), frozen_, run_done);
}

std::string Lifecycle::RoundName() const {
  if (!Initialising()) return StrCat("round ", round_);
  const FedSbInit& init = *store_.ledger().init;
  return StrCat("fed-sb initialisation step ", InitStep() + 1, " of ", init.total_steps(), " (",
                common::SketchStepName(InitStepKind(init, InitStep())), ")");
}

void Lifecycle::Waiting(std::string what) {
  if (what != waiting_for_) spdlog::info("{}", what);
  waiting_for_ = std::move(what);
}

void Lifecycle::MaybeStart() {
  if (phase_ != Phase::kWaitingForClients || !store_.has_ledger() || !failure_.ok()) return;
  if (paused_) return Waiting(paused_why_);
  const auto now = env_->Now();
  const std::vector<std::string> taking_part = clients_.TakingPart();
  if (taking_part.empty() && run_started_)
    return EndRun(StrCat("round ", round_, ": every client has left the run"));
  if (now < next_attempt_) return;  // the retry's backoff (Waiting said so)
  // The live clients: taking part and heard from within the client timeout. A silent one is left
  // out of cohorts until it calls again (a heartbeat, a poll or a join).
  std::vector<std::string> alive, silent;
  for (const std::string& id : taking_part)
    (clients_.Silent(id, now, Seconds(options_.client_timeout_s)) ? silent : alive).push_back(id);
  // Before the first round (of this process), min_clients must have joined, less the clients the
  // run removed (they cannot join again); after it, clients that left the run are not waited for,
  // silent ones are.
  const size_t min_clients = static_cast<size_t>(options_.min_clients);
  const size_t removed = clients_.removed().size();
  size_t needed = run_started_ ? std::min(min_clients, taking_part.size())
                               : std::max<size_t>(1, min_clients - std::min(min_clients, removed));
  if (options_.secure()) needed = std::max<size_t>(needed, 3);  // a sum of fewer reveals one
  if (!run_started_ && clients_.size() < needed) {
    return Waiting(
        StrCat("waiting for ", needed, " clients to join, ", clients_.size(), " joined"));
  }
  if (alive.size() < needed) {
    return Waiting(StrCat(RoundName(), " waits for ", needed, " live clients (", alive.size(),
                          " alive; silent past the ", options_.client_timeout_s,
                          " s timeout: ", fmt::format("{}", fmt::join(silent, ",")), ")"));
  }
  waiting_for_.clear();
  Open(alive);
}

bool Lifecycle::ChooseParts(size_t population) {
  std::vector<int64_t> joined;
  for (const std::string& id : open_.cohort) joined.push_back(clients_.Find(id)->num_examples);
  const double weight_cap = WeightCap(joined, options_.max_client_weight);
  std::optional<std::vector<common::MatrixShape>> sketch;
  if (Initialising()) sketch = InitProductShapes(store_.ledger(), InitStep());
  const bool fed_sb = options_.method == Method::kFedSb;
  std::vector<common::ModuleShape> shapes = store_.ledger().Shapes(options_.rank, fed_sb);
  if (options_.secure()) {
    const double largest = static_cast<double>(*std::max_element(joined.begin(), joined.end()));
    // The clients weigh their change by min(examples, cap)/cap with the cap an integer, as the
    // gate floors it.
    absl::StatusOr<bool> chosen = ChooseSecureParts(
        sketch, std::move(shapes), std::floor(std::min(weight_cap, largest)), population);
    if (!chosen.ok()) EndRun(StrCat(RoundName(), " cannot start: ", chosen.status().message()));
    if (chosen.ok() && !*chosen) EndRun("the privacy budget allows no further round");
    return chosen.ok() && *chosen;
  }
  open_.gate =
      std::make_shared<const UpdateGate>(&options_, &store_, shapes, frozen_, sketch, weight_cap);
  absl::StatusOr<std::unique_ptr<Accumulator>> chosen = [&]() -> decltype(chosen) {
    const size_t cohort = open_.cohort.size();
    if (dp_ != nullptr && sketch)
      return dp_->OpenSketchStep(*store_.ledger().client_dp, InitStep(), cohort, population,
                                 *sketch);
    if (dp_ != nullptr) {
      ASSIGN_OR_RETURN(Adapter start, AdapterAt(store_.ledger(), store_, version(), *frozen_));
      return dp_->OpenRound(*store_.ledger().client_dp, round_, cohort, population,
                            std::move(start));
    }
    std::unique_ptr<Accumulator> a;
    if (sketch) return std::make_unique<SketchSum>(*sketch);
    if (options_.method == Method::kFedIt || fed_sb)
      a = std::make_unique<WeightedMean>(options_.method, shapes, frozen_.get());
    else
      a = std::make_unique<EveryFactor>(
          common::AggregateOptions{options_.method, {.lambda = options_.lora_fair_lambda}});
    if (options_.norm_ratio() > 0)
      a = std::make_unique<MedianNormBound>(options_.norm_ratio(), std::move(a));
    return a;
  }();
  if (!chosen.ok()) {
    EndRun(StrCat(RoundName(), " cannot start: ", chosen.status().message()));
    return false;
  }
  if (*chosen == nullptr) {
    EndRun(Initialising() ? "the privacy budget does not cover fed-sb's initialisation"
                          : "the privacy budget allows no further round");
    return false;
  }
  open_.accumulator = *std::move(chosen);
  return true;
}

absl::StatusOr<bool> Lifecycle::ChooseSecureParts(
    std::optional<std::vector<common::MatrixShape>> sketch, std::vector<common::ModuleShape> shapes,
    double weight_cap, size_t population) {
  // Each client sends its change (or a Fed-SB initialisation step's answer) times
  // w = min(examples, cap)/cap, and the divisor is the survivors' Σ w from the examples they claim
  // (in the clear, as always). Under client-level DP every client weighs the same, the divisor is
  // the cohort drawn and the clients add the noise; an initialisation step's answers are then
  // scaled to norm 1 by the clients, as ClientDp's coordinator would.
  const bool dp = options_.client_dp();
  const double divisor = dp ? static_cast<double>(open_.cohort.size()) : 0;
  Adapter start;
  size_t length = 0;
  if (sketch) {
    for (const common::MatrixShape& m : *sketch) length += static_cast<size_t>(m.rows * m.cols);
  } else {
    ASSIGN_OR_RETURN(start, AdapterAt(store_.ledger(), store_, version(), *frozen_));
    length = common::TrainableCount(start);
  }
  SecureRound::Plan plan{.name = RoundName(),
                         .run_id = store_.ledger().run_id,
                         .round = round_,
                         .attempt = attempt_,
                         .cohort = open_.cohort,
                         .length = length,
                         .change_clip = !dp      ? options_.secagg_clip
                                        : sketch ? 1.0
                                                 : options_.dp_clip,
                         .weight_cap = dp ? 0 : weight_cap,
                         .noise_multiplier = !dp      ? 0
                                             : sketch ? options_.init_noise_multiplier()
                                                      : options_.dp_noise_multiplier,
                         .unit_norm = dp && sketch};
  ASSIGN_OR_RETURN(open_.secure, SecureRound::Open(options_, std::move(plan), verifier_));
  std::optional<SecureSum::Privacy> privacy;
  if (dp) {
    // The round must fit the budget even if only the threshold's clients survive to be summed.
    const double q = divisor / static_cast<double>(population);
    const ClientDpState& state = *store_.ledger().client_dp;
    const common::PrivacyRound entry =
        ClientDp::SecureEntry(round_, q, open_.secure->config(), open_.secure->graph().threshold);
    // lora-fair's correction is a second release of the round: a first check with the first's
    // entry twice; the second's own entry is checked when it opens (if it does not fit, the round
    // commits uncorrected).
    ClientDpState before = state;
    if (options_.method == common::Method::kLoraFair) before.rounds.push_back(entry);
    ASSIGN_OR_RETURN(const bool within, dp_->Within(before, entry, RoundName()));
    if (!within) return false;
    privacy = SecureSum::Privacy{dp_, state, round_, q};
  }
  if (sketch)
    open_.accumulator =
        std::make_unique<SecureSum>(open_.secure.get(), *sketch, divisor, std::move(privacy));
  else
    open_.accumulator = std::make_unique<SecureSum>(open_.secure.get(), std::move(start), divisor,
                                                    std::move(privacy));
  open_.gate = std::make_shared<const UpdateGate>(&options_, &store_, std::move(shapes), frozen_,
                                                  std::move(sketch), weight_cap,
                                                  open_.secure->masked_bytes());
  return true;
}

void Lifecycle::Open(const std::vector<std::string>& alive) {
  open_ = OpenRound{};
  open_.attempt = attempt_;
  open_.cohort =
      SampleCohort(alive, options_.seed, round_, attempt_, options_.fraction, options_.min_cohort);
  uploads_.Clear(round_);
  clients_.NewRound();
  if (!ChooseParts(alive.size())) return;
  open_.started = env_->Now();
  if (!run_started_) run_started_ = open_.started;
  if (attempt_ == 0) first_attempt_ = open_.started;
  phase_ = Phase::kTraining;
  spdlog::info("{}{}: cohort of {} of {} clients: {}", RoundName(),
               attempt_ ? StrCat(" (attempt ", attempt_ + 1, ")") : "", open_.cohort.size(),
               alive.size(), fmt::join(open_.cohort, ","));
}

void Lifecycle::EndRun(const std::string& why) {
  spdlog::warn("{}", why);
  phase_ = Phase::kDone;
  open_ = OpenRound{};
  spdlog::info("run {} ended at version {} of {} rounds", store_.ledger().run_id, version(),
               options_.rounds);
  HandOver(/*run_done=*/true);
}

void Lifecycle::DropUpload(const std::string& client) {
  // Once a secure round's masked inputs are summed, one cannot be taken out: it stays in.
  if (!open_.secure || open_.secure->step() <= SecureRound::Step::kInput)
    uploads_.Drop(round_, client);
}

bool Lifecycle::SecureWaits(const std::string& client) const {
  const SecureRound& s = *open_.secure;
  return s.Waits(client) && !(s.step() == SecureRound::Step::kInput && uploads_.Accepted(client));
}

bool Lifecycle::Answered(const std::string& client) const {
  if (open_.declined.contains(client)) return true;
  return open_.secure ? !SecureWaits(client) : uploads_.Accepted(client);
}

bool Lifecycle::EveryMemberAnswered() const {
  return std::all_of(open_.cohort.begin(), open_.cohort.end(),
                     [&](const std::string& id) { return Answered(id); });
}

void Lifecycle::Accepted(const std::string& client) {
  spdlog::info("{}: accepted {}'s update; {} of {} arrived", RoundName(), client,
               uploads_.ArrivedCount(), open_.cohort.size());
  if (EveryMemberAnswered()) MaybeClose();
}

void Lifecycle::Rejected(const std::string& client, absl::string_view why) {
  ++open_.rejected[client];
  CountRejection(client, committed_, why);
}

void Lifecycle::CountRejection(const std::string& client, int64_t step, absl::string_view why) {
  ClientInfo* info = clients_.Find(client);
  if (info == nullptr || clients_.RemovedWhy(client) != nullptr) return;
  // One strike per round (or Fed-SB initialisation step): a node retries a refused update, every
  // chunk of an upload is checked, and a round without quorum is retried with new attempts.
  if (const auto [it, first] = struck_.try_emplace(client, step); !first) {
    if (it->second == step) return;
    it->second = step;
  }
  ++info->rejected_updates;
  if (options_.max_rejections == 0 || info->rejected_updates < options_.max_rejections) return;
  // `why` may quote what the client sent: the ledger keeps at most 200 bytes of it.
  const std::string reason =
      StrCat("removed from the run after ", info->rejected_updates,
             " rounds with a rejected update (--max-rejections; the last: ",
             why.size() > 200 ? StrCat(why.substr(0, 200), "…") : std::string(why), ")");
  spdlog::warn("{}: {}", client, reason);
  clients_.Remove(client, reason);
  removed_[client] = reason;
  Leave(client, round_, reason);
}

void Lifecycle::ReapplyRemovals(const Ledger& l) {
  std::map<std::string, std::string> removed;  // the latest reason of each client wins
  const auto add = [&](const common::Participation& who) {
    for (const auto& [id, why] : who.removed) removed[id] = why;
  };
  if (l.init) {
    for (const FedSbInit::Step& step : l.init->steps) add(step.record.who);
  }
  for (const Version& v : l.versions) {
    if (v.init_record) add(v.init_record->who);
    if (v.record) add(v.record->who);
  }
  if (options_.max_rejections == 0 &&
      std::erase_if(removed, [](const auto& r) { return !r.second.starts_with(kOperatorRemoval); }))
    spdlog::info("with --max-rejections 0, clients removed for rejected updates take part again");
  for (const auto& [id, why] : store_.operator_removals()) {
    // Removed by an operator before the restart, but no round recorded it: the next one does.
    if (!removed.contains(id)) removed_[id] = why;
    removed[id] = why;
  }
  if (removed.empty()) return;
  std::vector<std::string> ids;
  for (const auto& [id, why] : removed) {
    clients_.Remove(id, why);
    ids.push_back(id);
  }
  spdlog::info("the run removed {}, who stay removed", fmt::join(ids, ", "));
}

absl::Status Lifecycle::SecAgg(const std::string& client, const std::string& certificate,
                               const v1::SecAggRequest& request) {
  if (phase_ != Phase::kTraining || closing() || !open_.secure || request.round() != round_ ||
      !open_.InCohort(client) || open_.declined.contains(client)) {
    return WithReason(
        absl::FailedPreconditionError(
            StrCat("no secure aggregation of round ", request.round(), " waits for ", client, " (",
                   RoundName(), phase_ == Phase::kTraining ? " is open)" : " is not open)")),
        v1::ErrorDetail::STALE_TASK);
  }
  if (open_.first && open_.first->Took(client, request))
    return absl::OkStatus();  // a retry of the first sum's last message, after it closed
  if (request.instance() != open_.secure->config().instance())
    return WithReason(absl::FailedPreconditionError(StrCat(
                          RoundName(), "'s open secure aggregation is ",
                          open_.secure->config().instance(), "; ", client, " answered another")),
                      v1::ErrorDetail::STALE_TASK);
  if (request.step_case() == v1::SecAggRequest::kDecline) {
    const std::string why = request.decline().substr(0, 1024);
    spdlog::warn("{}: {} declines its secure aggregation: {}", RoundName(), client, why);
    open_.declined[client] = why;
    DropUpload(client);
    if (EveryMemberAnswered()) MaybeClose();
    return absl::OkStatus();
  }
  if (open_.secure->Took(client, request)) return absl::OkStatus();  // a retry: answered again
  if (!open_.secure->Waits(client))
    return WithReason(absl::FailedPreconditionError(StrCat(
                          RoundName(), "'s secure aggregation is at its ", open_.secure->StepName(),
                          " step, which does not wait for this message of ", client)),
                      v1::ErrorDetail::STALE_TASK);
  RETURN_IF_ERROR(open_.secure->Receive(client, certificate, request));
  if (EveryMemberAnswered()) MaybeClose();
  return absl::OkStatus();
}

void Lifecycle::Late(const std::string& client, int64_t round) {
  if (late_.emplace(client, round).second) {
    spdlog::warn("{}'s update for round {} came after that round closed; not counted (late)",
                 client, round);
  }
}

void Lifecycle::Leave(const std::string& client, int64_t round, const std::string& reason) {
  // A member of a secure round that took the open step already would still be waited for in the
  // next: its leave counts too.
  if (phase_ != Phase::kTraining || closing() || round != round_ || !open_.InCohort(client) ||
      (open_.secure ? open_.declined.contains(client) : Answered(client)))
    return;
  open_.declined[client] = reason;
  DropUpload(client);
  // Nobody left to wait for: close the round now (or retry it without quorum).
  if (EveryMemberAnswered()) MaybeClose();
}

void Lifecycle::Remove(const std::string& client, const std::string& reason) {
  clients_.Remove(client, reason);
  removed_[client] = reason;
  if (phase_ != Phase::kTraining || closing() || !open_.InCohort(client)) return;
  DropUpload(client);
  open_.declined[client] = reason;
  if (EveryMemberAnswered()) MaybeClose();
}

void Lifecycle::Pause(bool paused, const std::string& why) {
  paused_ = paused;
  paused_why_ = why;
  if (!paused) waiting_for_.clear();
  MaybeStart();
}

void Lifecycle::MaybeClose() {
  if (open_.secure) return AdvanceSecure();
  const size_t arrived = uploads_.ArrivedCount();
  // Members that declined their task are not waited for, and not counted in the quorum.
  const size_t quorum = QuorumOf(options_.quorum, open_.cohort.size() - open_.declined.size());
  if (arrived >= quorum) return Commit();
  RetryRound(StrCat(RoundName(), ": ", arrived, " of ", open_.cohort.size(),
                    " updates arrived, quorum is ", quorum));
}

void Lifecycle::AdvanceSecure() {
  SecureRound& s = *open_.secure;
  if (s.step() == SecureRound::Step::kKeys && !open_.first) {
    // The members that trained and advertised their keys are the round's arrivals.
    size_t keyed = 0;
    for (const std::string& id : open_.cohort)
      keyed += !s.Waits(id) && !open_.declined.contains(id);
    const size_t quorum = QuorumOf(options_.quorum, open_.cohort.size() - open_.declined.size());
    if (keyed < quorum)
      return RetryRound(StrCat(RoundName(), ": ", keyed, " of ", open_.cohort.size(),
                               " members trained and advertised keys, quorum is ", quorum));
  }
  const std::string_view ended = s.StepName();
  if (absl::Status st = s.Advance(uploads_.AcceptedUpdates(), store_); !st.ok()) {
    const std::string why =
        StrCat(RoundName(), ": secure aggregation", open_.first ? "'s correction" : "",
               " stopped after its ", ended, " step: ", st.message());
    if (!open_.first) return RetryRound(why);
    spdlog::warn("{}; the round commits Ā, B̄ uncorrected", why);
    return Commit();
  }
  if (s.step() == SecureRound::Step::kDone)
    return options_.method == common::Method::kLoraFair && !open_.first ? OpenCorrection()
                                                                        : Commit();
  open_.step_started = env_->Now();
  size_t waiting = 0;
  for (const std::string& id : open_.cohort) waiting += SecureWaits(id);
  spdlog::info("{}: secure aggregation: {} step, {} clients", RoundName(), s.StepName(), waiting);
  if (EveryMemberAnswered()) AdvanceSecure();
}

void Lifecycle::OpenCorrection() {
  // Ā and B̄, the first sum's output: the round's if the second sum cannot run or finish. (It is
  // never retrained: a second sum of the same updates over another cohort would reveal their
  // difference.)
  absl::StatusOr<RoundOutput> first =
      open_.accumulator->Aggregate(uploads_.AcceptedUpdates(), *open_.gate);
  if (!first.ok()) return Commit();  // which fails the same way, and is retried as a commit is
  open_.first_uploads.emplace(uploads_);
  uploads_.Clear(round_);
  open_.first = std::move(open_.secure);
  const SecureRound& done = *open_.first;
  const bool dp = options_.client_dp();
  std::unique_ptr<SecureRound> second;
  Adapter start;
  std::optional<SecureSum::Privacy> privacy;
  const absl::Status opened = [&]() -> absl::Status {
    ASSIGN_OR_RETURN(start, AdapterAt(store_.ledger(), store_, version(), *frozen_));
    // Each client's (s_k B_k A_k − B_0 A_0)·Āᵀ, clipped (flat over the modules) at the first
    // sum's clip times max_i ‖Ā_i‖₂, as central DP's correction clips it.
    size_t length = 0;
    double a_norm = 0;
    for (size_t i = 0; i < first->adapter.num_modules(); ++i) {
      const common::LoraModule& m = first->adapter.module(i);
      length += static_cast<size_t>(m.out_features * m.rank);
      a_norm = std::max(a_norm, common::SpectralNorm(first->adapter.A(i).cast<double>()));
    }
    if (!(a_norm > 0)) return absl::FailedPreconditionError("the first sum's Ā is zero");
    std::vector<std::string> cohort;  // the survivors that have not left the round since
    for (const std::string& id : done.survivors())
      if (!open_.declined.contains(id)) cohort.push_back(id);
    SecureRound::Plan plan{.name = StrCat(RoundName(), "'s lora-fair correction"),
                           .run_id = store_.ledger().run_id,
                           .round = round_,
                           .attempt = attempt_,
                           .cohort = std::move(cohort),
                           .length = length,
                           .change_clip = done.config().change_clip() * a_norm,
                           .weight_cap = done.config().weight_cap(),
                           .noise_multiplier = dp ? options_.dp_noise_multiplier : 0};
    ASSIGN_OR_RETURN(second, SecureRound::Open(options_, std::move(plan), verifier_));
    if (dp) {  // both releases must fit, even if only the threshold's clients survive this one
      privacy = SecureSum::Privacy{dp_, *first->dp_state, round_, first->client_dp->sample_rate};
      const common::PrivacyRound entry =
          ClientDp::SecureEntry(round_, privacy->q, second->config(), second->graph().threshold);
      ASSIGN_OR_RETURN(const bool within, dp_->Within(privacy->state, entry, RoundName()));
      if (!within) return absl::FailedPreconditionError("the privacy budget does not cover it");
    }
    return absl::OkStatus();
  }();
  if (opened.ok()) {  // Ā for the clients (B̄ they do not need), from memory (RoundBlob)
    Adapter a_bar = first->adapter;
    for (size_t i = 0; i < a_bar.num_modules(); ++i) a_bar.B(i).setZero();
    open_.mean_blob = common::EncodeAdapter(a_bar, common::AdapterParts::kAll);
    open_.mean_ref.set_sha256(common::Sha256Hex(open_.mean_blob));
    open_.mean_ref.set_size(static_cast<int64_t>(open_.mean_blob.size()));
    open_.mean_ref.set_kind(v1::BLOB_KIND_ADAPTER);
    open_.mean_ref.set_version(round_);
  } else {
    second.reset();
  }
  open_.accumulator = std::make_unique<SecureCorrection>(
      second.get(), &uploads_, *std::move(first), std::move(start),
      dp ? static_cast<double>(open_.cohort.size()) : 0, options_.lora_fair_lambda,
      std::move(privacy));
  if (!opened.ok()) {
    spdlog::warn("{}: lora-fair's correction cannot run ({}); the round commits Ā, B̄ uncorrected",
                 RoundName(), opened.message());
    return Commit();
  }
  open_.gate = std::make_shared<const UpdateGate>(
      &options_, &store_, store_.ledger().Shapes(options_.rank, false), frozen_, std::nullopt,
      done.config().weight_cap(), second->masked_bytes());
  open_.secure = std::move(second);
  open_.step_started = env_->Now();
  spdlog::info("{}: secure aggregation: lora-fair's correction, keys step, {} clients", RoundName(),
               open_.secure->config().cohort_size());
}

bool Lifecycle::InProtocol() const {
  return open_.secure && (open_.first || open_.secure->step() != SecureRound::Step::kKeys);
}

const std::string* Lifecycle::RoundBlob(const std::string& client,
                                        const std::string& sha256) const {
  const bool asked = open_.first && open_.secure && sha256 == open_.mean_ref.sha256() &&
                     open_.secure->Waits(client);
  return asked ? &open_.mean_blob : nullptr;
}

void Lifecycle::RetryRound(const std::string& why) {
  // Retried with a new cohort of the live clients, after a backoff (0.5 s doubling to 30 s), so a
  // round that cannot reach its quorum does not retrain the live clients in a loop.
  ++attempt_;
  const double backoff = Retry::BackoffSeconds(attempt_);
  next_attempt_ = env_->Now() + ToDuration(backoff);
  spdlog::warn("{}; retrying in {:.1f} s with a new cohort of the live clients", why, backoff);
  uploads_.Clear(round_);
  open_ = OpenRound{};
  phase_ = Phase::kWaitingForClients;
  Waiting(StrCat(RoundName(), " is retried (attempt ", attempt_ + 1, ") after ", backoff, " s"));
  MaybeStart();
}

common::Participation Lifecycle::Who() const {
  common::Participation who;
  who.attempt = open_.attempt + 1;
  who.cohort = open_.cohort;
  who.rejected = open_.rejected;
  who.declined = open_.declined;
  who.removed = removed_;
  for (const std::string& id : open_.cohort)
    who.bytes_down[id] = clients_.Find(id)->bytes_down_this_round;
  who.elapsed_seconds = Seconds(env_->Now() - *run_started_).count();
  return who;
}

void Lifecycle::CommitFailed(const absl::Status& status, const std::string& what) {
  if (std::optional<absl::Status> give_up = commit_retry_.Failed(
          env_->Now(), status,
          StrCat("committing ", RoundName(), " (its ", uploads_.ArrivedCount(), " accepted ", what,
                 " are kept, and it is committed once the write succeeds)"),
          options_, log_limiter_))
    failure_ = *give_up;
}

void Lifecycle::CommitInitStep() {
  const FedSbInit& init = *store_.ledger().init;
  const std::string name = RoundName();
  RoundFacts facts{0, Who(), {}};
  absl::StatusOr<Adapter> frozen = [&]() -> absl::StatusOr<Adapter> {
    ASSIGN_OR_RETURN(const RoundOutput output,
                     open_.accumulator->Aggregate(uploads_.AcceptedUpdates(), *open_.gate));
    common::InitStepRecord record{
        InitStep() + 1,
        init.total_steps(),
        std::string(common::SketchStepName(InitStepKind(init, InitStep()))),
        RecordOf(facts, output, uploads_, options_.method).who,
        output.client_dp,
        {},
        {}};
    return server::CommitInitStep(store_, options_.rank, output, std::move(record));
  }();
  if (!frozen.ok()) return CommitFailed(frozen.status(), "answers");
  commit_retry_.Succeeded();
  ++committed_;
  const size_t arrived = uploads_.ArrivedCount();
  uploads_.Clear(round_);
  late_.clear();
  removed_.clear();
  attempt_ = 0;
  phase_ = Phase::kWaitingForClients;
  spdlog::info("{} closed: {} of {} answers", name, arrived, open_.cohort.size());
  open_ = OpenRound{};
  if (frozen->num_modules() > 0) {
    frozen_ = std::make_shared<const Adapter>(*std::move(frozen));
    round_ = 1;
    double r0 = 0;
    for (size_t i = 0; i < frozen_->num_modules(); ++i) r0 += frozen_->R(i).squaredNorm();
    spdlog::info(
        "fed-sb initialised from the clients' gradient: version 0 holds B, A and R0 (‖R0‖_F = "
        "{:.6g} over {} modules)",
        std::sqrt(r0), frozen_->num_modules());
  }
  MaybeStart();
}

void Lifecycle::Commit() {
  if (Initialising()) return CommitInitStep();
  const RoundFacts facts{round_, Who(), late_};
  const absl::StatusOr<common::RoundRecord> record =
      CloseRound(facts, *open_.accumulator, *open_.gate,
                 open_.first_uploads ? *open_.first_uploads : uploads_, store_);
  if (!record.ok()) return CommitFailed(record.status(), "updates");
  if (commit_retry_.pending())
    spdlog::info("round {}: committed after {} failed attempts", round_, commit_retry_.failures());
  commit_retry_.Succeeded();
  const int64_t step = committed_++;
  // The round is done: everything below is in memory or derived from the ledger.
  for (const std::string& id : record->who.arrived)
    if (!record->norm_outliers.contains(id)) clients_.Find(id)->rounds_contributed++;
  if (open_.first_uploads) {  // lora-fair's second masked inputs: summed, and recorded nowhere
    for (const AcceptedUpdate& u : uploads_.AcceptedUpdates()) {
      const auto recorded = record->updates.find(u.client);
      if (recorded == record->updates.end() || recorded->second != u.sha256)
        store_.DropBlob(u.sha256);
    }
  }
  uploads_.Clear(round_);
  late_.clear();
  removed_.clear();
  if (const auto& dp = record->client_dp) {
    spdlog::info(
        "round {}: client-level DP spent epsilon {:.4f} at delta {} (order {}; q {:.4g}, noise "
        "multiplier {}, clip {:.6g}, next clip {:.6g})",
        round_, dp->epsilon.value_or(INFINITY), dp->delta, dp->order, dp->sample_rate,
        dp->noise_multiplier, dp->clip, dp->next_clip.value_or(dp->clip));
  }
  if (!record->dp_epsilon.empty())
    spdlog::info("round {}: DP-SGD epsilon spent by clients: {}", round_,
                 nlohmann::json(record->dp_epsilon).dump());
  spdlog::info(
      "round {} closed: {} of {} updates{}; mean loss {:.6g} -> {:.6g}; aggregated in {:.3f} s; "
      "version {}",
      round_, record->who.arrived.size(), open_.cohort.size(),
      record->dropped.empty() ? "" : fmt::format(" (dropped: {})", fmt::join(record->dropped, ",")),
      record->mean_loss_before, record->mean_train_loss, record->aggregation_seconds, round_);
  open_ = OpenRound{};
  view_.ObserveRound(Seconds(env_->Now() - first_attempt_).count());
  view_.CountAccepted(
      static_cast<int64_t>(record->who.arrived.size() - record->norm_outliers.size()));
  for (size_t i = 0; i < record->norm_outliers.size(); ++i) view_.CountRejected("norm_outlier");
  const bool done = round_ >= options_.rounds;
  if (done) {
    phase_ = Phase::kDone;
    spdlog::info("run {} done after {} rounds", store_.ledger().run_id, options_.rounds);
  } else {
    ++round_;
    attempt_ = 0;
    phase_ = Phase::kWaitingForClients;
  }
  // Counted once the round is over (recorded with the next): the update was accepted, and a
  // removal has no round to leave. After the last round, no round is left to be removed from.
  for (const auto& [id, norm] : done ? common::PerClientValue{} : record->norm_outliers) {
    CountRejection(id, step,
                   StrCat("round ", record->round, " left its update out: its norm ", norm,
                          " was over ", options_.max_update_norm_ratio, " × the round's median"));
  }
  HandOver(done);
  MaybeStart();
}

void Lifecycle::Tick() {
  const auto now = env_->Now();
  if (failure_.ok() && closing()) {
    if (commit_retry_.Due(now)) Commit();
  } else if (failure_.ok() && phase_ == Phase::kTraining) {
    const bool deadline = InProtocol()
                              ? now - open_.step_started >= Seconds(options_.secagg_step_timeout_s)
                              : now - open_.started >= Seconds(options_.round_deadline_s);
    // Every member that has not answered is silent past the timeout: waiting cannot help.
    const bool all_silent =
        std::all_of(open_.cohort.begin(), open_.cohort.end(), [&](const std::string& id) {
          return Answered(id) || clients_.Silent(id, now, Seconds(options_.client_timeout_s));
        });
    // An update whose last chunk has arrived is not cut off while it is checked (a fraction of a
    // second per 100 MB): the round closes at the next tick after.
    if ((deadline || all_silent) && !uploads_.AnyVerifying()) MaybeClose();
  }
  MaybeStart();
}

bool Lifecycle::StillWanted(const std::string& client, int64_t round) const {
  return phase_ == Phase::kTraining && round == round_ && !closing() && open_.InCohort(client);
}

RoundView Lifecycle::View() const {
  RoundView v;
  // Under secure aggregation only masked inputs are uploaded, by the clients that shared keys.
  const bool secure_input = open_.secure && open_.secure->step() == SecureRound::Step::kInput;
  v.open = phase_ == Phase::kTraining && (!open_.secure || secure_input);
  v.done = phase_ == Phase::kDone;
  v.closing = closing();
  v.round = round_;
  v.init_step = Initialising() ? InitStep() : -1;
  v.version = store_.has_ledger() ? version() : -1;
  v.cohort = secure_input ? &open_.secure->senders() : &open_.cohort;
  return v;
}

Lifecycle::TaskState Lifecycle::State() const {
  return {phase_,
          round_,
          store_.has_ledger() ? version() : -1,
          Initialising() ? InitStep() : -1,
          open_.cohort.size(),
          closing(),
          open_.secure ? static_cast<int>(open_.secure->step()) : -1};
}

v1::Task Lifecycle::TaskFor(const std::string& client, int64_t have_version) const {
  v1::Task task;
  task.set_method(common::ToWire(options_.method));
  task.set_round(round_);
  task.set_state_version(version());
  if (phase_ == Phase::kDone) {
    task.set_kind(v1::Task::DONE);
    task.set_round(version());
    for (auto& b : DownloadsFor(store_.ledger(), have_version, version()))
      *task.add_downloads() = std::move(b);
    return task;
  }
  const bool in_cohort = open_.InCohort(client);
  if (phase_ != Phase::kTraining || !in_cohort || Answered(client) || closing()) {
    task.set_kind(v1::Task::WAIT);
    task.set_note(phase_ == Phase::kWaitingForClients ? waiting_for_
                  : !in_cohort                        ? StrCat("not in ", RoundName(), "'s cohort")
                  : closing() ? StrCat(RoundName(), " is closing; its commit is being retried")
                  : open_.secure
                      ? StrCat(RoundName(), ": secure aggregation's ", open_.secure->StepName(),
                               " step goes on")
                      : StrCat("answer to ", RoundName(), " accepted; waiting for it to close"));
    return task;
  }
  if (InProtocol()) {
    std::optional<v1::SecAggStep> step = open_.secure->StepFor(client);
    if (open_.first && open_.secure->step() == SecureRound::Step::kKeys &&
        open_.secure->Waits(client)) {  // lora-fair's correction: from the first sum's survivors
      step.emplace();
      step->set_instance(open_.first->config().instance());
      *step->mutable_correction()->mutable_config() = open_.secure->config();
      *step->mutable_correction()->mutable_mean() = open_.mean_ref;
    }
    task.set_kind(step ? v1::Task::SECAGG : v1::Task::WAIT);
    if (step) *task.mutable_secagg() = *std::move(step);
    return task;
  }
  if (open_.secure) *task.mutable_secagg_config() = open_.secure->config();
  if (Initialising()) {
    task.set_kind(v1::Task::SKETCH);
    FillSketchTask(store_.ledger(), &task);
  } else {
    task.set_kind(v1::Task::TRAIN);
    for (auto& b : DownloadsFor(store_.ledger(), have_version, version()))
      *task.add_downloads() = std::move(b);
    v1::TrainSettings* s = task.mutable_settings();
    s->set_rank(RankOf(client));
    s->set_lora_alpha(options_.lora_alpha);
    s->set_local_steps(options_.local_steps);
    s->set_learning_rate(options_.learning_rate);
    s->set_seed(common::Fnv1a(client, options_.seed * 1000003ull + static_cast<uint64_t>(round_)));
  }
  for (const ModuleSpec& m : store_.ledger().modules) {
    v1::ModuleSpec* spec = task.add_modules();
    spec->set_name(m.name);
    spec->set_in_features(m.in_features);
    spec->set_out_features(m.out_features);
  }
  task.set_heartbeat_interval_ms(static_cast<int64_t>(options_.client_timeout_s * 1000 / 3));
  return task;
}

void Lifecycle::FillStatus(v1::StatusResponse& s) const {
  s.set_run_id(store_.has_ledger() ? store_.ledger().run_id : "");
  s.set_method(common::ToWire(options_.method));
  s.set_round(phase_ == Phase::kDone ? version() : round_);
  s.set_rounds(options_.rounds);
  s.set_state_version(store_.has_ledger() ? version() : -1);
  if (phase_ == Phase::kWaitingForClients) s.set_waiting_for(waiting_for_);
  if (paused_ && phase_ == Phase::kTraining) s.set_waiting_for(paused_why_);
  s.set_phase(!failure_.ok()           ? "failed"
              : phase_ == Phase::kDone ? "done"
              : closing()              ? "closing (retrying the commit)"
              : phase_ == Phase::kTraining
                  ? (InProtocol()
                         ? StrCat("secure aggregation: ", open_.first ? "correction's " : "",
                                  open_.secure->StepName())
                     : Initialising() ? RoundName()
                                      : "training")
                  : "waiting for clients");
  for (const auto& id : open_.cohort) s.add_cohort(id);
  for (const auto& id : uploads_.ArrivedIds()) s.add_arrived(id);
}

}  // namespace fedlora::server
