#include "server/round_engine.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <future>
#include <random>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/gguf_export.h"
#include "common/tensor/blob.h"
#include "server/cohort.h"
#include "server/errors.h"
#include "server/exporter.h"
#include "server/round_close.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;
using common::MethodName;
using common::StrCat;
using Seconds = std::chrono::duration<double>;

// 128 random bits in hex: a session id that no other join, of this process or an earlier one, has.
std::string NewSessionId() {
  std::random_device random;
  return fmt::format("{:08x}{:08x}{:08x}{:08x}", random(), random(), random(), random());
}

}  // namespace

absl::StatusOr<std::unique_ptr<RoundEngine>> RoundEngine::Create(const ServerOptions& given,
                                                                 common::Env* env) {
  RETURN_IF_ERROR(given.Validate());
  ServerOptions options = given;
  std::unique_ptr<Evaluator> evaluator;
  if (!options.base_model_dir.empty()) {
    ASSIGN_OR_RETURN(evaluator, Evaluator::Load(options));
    options.base_model_sha256 = evaluator->fingerprint();  // clients must hold this model
    // A model llama.cpp cannot take is refused now, not at the end of the run.
    if (!options.export_gguf.empty())
      RETURN_IF_ERROR(common::CheckGgufExport(options.base_model_dir));
  }
  ASSIGN_OR_RETURN(StateStore store, StateStore::Open(options.state_dir, env));
  std::unique_ptr<RoundEngine> engine(new RoundEngine(options, env, std::move(store)));
  engine->evaluator_ = std::move(evaluator);
  if (options.client_dp()) {
    ASSIGN_OR_RETURN(engine->dp_, ClientDpRounds::Create(engine->options_));
    spdlog::info(
        "client-level DP: updates clipped to {} ({}), noise multiplier {}, delta {}{}; every "
        "client weighs the same and the divisor is the cohort drawn",
        options.dp_clip, options.dp_adaptive_clip ? "adaptive, initial" : "fixed",
        options.dp_noise_multiplier, options.dp_delta,
        options.dp_target_epsilon > 0 ? StrCat(", target epsilon ", options.dp_target_epsilon)
                                      : "");
    if (options.dp_noise_multiplier == 0)
      spdlog::warn("client-level DP without noise: updates are clipped, but epsilon is infinite");
  }
  RETURN_IF_ERROR(engine->Resume());
  return engine;
}

RoundEngine::RoundEngine(const ServerOptions& options, common::Env* env, StateStore store)
    : options_(options),
      method_(options.method),
      env_(env),
      store_(std::move(store)),
      uploads_(&store_) {}

absl::Status RoundEngine::Resume() {
  if (!store_.has_ledger()) {
    spdlog::info("new {} run in {}: waiting for {} clients", MethodName(method_),
                 options_.state_dir, options_.min_clients);
    return absl::OkStatus();
  }
  const Ledger& l = store_.ledger();
  if (l.versions.size() > 1 && l.client_dp.has_value() != options_.client_dp()) {
    return absl::FailedPreconditionError(
        StrCat("state directory ", options_.state_dir,
               l.client_dp ? " holds a run with" : " holds a run without",
               " client-level DP; continue it with the same dp settings or use another state_dir"));
  }
  if (l.method != method_) {
    return absl::FailedPreconditionError(StrCat(
        "state directory ", options_.state_dir, " holds a ", common::MethodName(l.method),
        " run but method is ", MethodName(method_), "; use another state_dir for a new run"));
  }
  if (evaluator_ && l.base_model_sha256 != options_.base_model_sha256) {
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
  if (l.initialising()) {
    round_ = 0;
    spdlog::info("continuing run {} from {}: fed-sb initialisation at step {} of {}", l.run_id,
                 options_.state_dir, init_step() + 1, l.init->total_steps());
    return absl::OkStatus();
  }
  if (method_ == Method::kFedSb) {
    ASSIGN_OR_RETURN(std::string bytes, store_.ReadWholeBlob(l.at(0).blobs.at(0).sha256));
    ASSIGN_OR_RETURN(frozen_, common::DecodeAdapter(bytes, "frozen blob"));
  }
  validator_ = UpdateValidator(method_, TrainedShapes(), frozen_, TaskScaling());
  round_ = version() + 1;
  if (version() >= options_.rounds) phase_ = Phase::kDone;
  spdlog::info("continuing run {} from {}: version {} of {} rounds", l.run_id, options_.state_dir,
               version(), options_.rounds);
  // What follows the committed rounds may be missing (a failure, or a kill, after a commit); the
  // final export is redone in any case.
  if (evaluator_) {
    RETURN_IF_ERROR(
        evaluator_->MergeFloraUpTo(store_, std::min(store_.metrics_version(), version())));
  }
  follow_up_retry_.pending = store_.metrics_version() < version() || phase_ == Phase::kDone;
  std::lock_guard<std::mutex> lock(mu_);
  FollowUpLocked();
  return absl::OkStatus();
}

void RoundEngine::Shutdown() {
  LongPolls::Ready ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    CollectReadyLocked(&ready, /*all=*/true);
  }
  LongPolls::Deliver(ready);
}

bool RoundEngine::done() {
  std::lock_guard<std::mutex> lock(mu_);
  return phase_ == Phase::kDone && !follow_up_retry_.pending;
}

absl::Status RoundEngine::failed() {
  std::lock_guard<std::mutex> lock(mu_);
  return failure_;
}

absl::Status RoundEngine::InitializeRunLocked(const v1::JoinRequest& first) {
  Ledger ledger;
  std::mt19937_64 rng(options_.seed ^ 0x5eedf00dull);
  ledger.run_id = fmt::format("{}-{:016x}", MethodName(method_),
                              common::Fnv1a(StrCat(options_.seed, first.base_model_sha256())));
  ledger.method = method_;
  ledger.base_model_sha256 = first.base_model_sha256();
  for (const v1::ModuleSpec& m : first.modules()) {
    bool wanted = options_.target_modules.empty();
    for (const std::string& t : options_.target_modules)
      wanted |= m.name().ends_with("." + t) || m.name() == t;
    if (wanted) ledger.modules.push_back({m.name(), m.in_features(), m.out_features()});
  }
  if (ledger.modules.empty()) {
    return absl::InvalidArgumentError(
        StrCat("none of the client's ", first.modules_size(), " modules matches target_modules ",
               fmt::format("{}", fmt::join(options_.target_modules, ","))));
  }
  // What the run would ask each client to send, before anything is allocated for it.
  int64_t floats = 0;
  for (const ModuleSpec& m : ledger.modules) {
    floats += int64_t{options_.rank} * (m.in_features + m.out_features + options_.rank);
    if (method_ == Method::kFedSb && options_.rank > std::min(m.in_features, m.out_features)) {
      return absl::InvalidArgumentError(
          StrCat("fed-sb's B (m×r) and A (r×n) have orthonormal columns and rows, so rank ",
                 options_.rank, " cannot exceed module ", m.name, "'s ", m.out_features, "x",
                 m.in_features, "; choose target_modules or a lower rank"));
    }
  }
  if (floats * 4 > options_.max_update_bytes) {
    return absl::InvalidArgumentError(
        StrCat("an adapter of the client's ", ledger.modules.size(), " modules at rank ",
               options_.rank, " takes ", floats * 4, " bytes, more than max_update_bytes (",
               options_.max_update_bytes, "); choose target_modules or raise the limit"));
  }
  if (options_.client_dp()) ledger.client_dp = ClientDpState{options_.dp_clip, {}};
  ledger.init = NewFedSbInit(options_);
  if (ledger.init) {
    // B, A and R0 from the clients' gradient, in round 0 (fed_sb_init.h); version 0 comes last.
    RETURN_IF_ERROR(store_.SaveLedger(ledger));
    round_ = 0;
    spdlog::info(
        "run {} created: base model {}, {} modules, rank {}; fed-sb initialises from the clients' "
        "gradient over {} records each ({}, {} steps)",
        ledger.run_id, ledger.base_model_sha256, ledger.modules.size(), options_.rank,
        ledger.init->examples,
        ledger.init->mode == "dense" ? "dense" : StrCat("sketch of width ", ledger.init->columns),
        ledger.init->total_steps());
    return absl::OkStatus();
  }
  // Version 0, the state every client starts from (flora's clients start from the base alone).
  Version v0{0, {}, nullptr};
  Adapter frozen;
  if (method_ == Method::kFedIt || method_ == Method::kLoraFair) {
    ASSIGN_OR_RETURN(Adapter init, Adapter::Create(ledger.Shapes(options_.rank, false)));
    for (size_t i = 0; i < init.num_modules(); ++i) common::InitLoraA(init.A(i), rng);
    ASSIGN_OR_RETURN(BlobRef blob,
                     store_.PutBlob(common::EncodeAdapter(init), BlobKind::kAdapter, 0));
    v0.blobs.push_back(std::move(blob));
  } else if (method_ == Method::kFedSb) {  // fed_sb_init = random: B, A orthonormal, R0 = 0
    ASSIGN_OR_RETURN(frozen, Adapter::Create(ledger.Shapes(options_.rank, true)));
    for (size_t i = 0; i < frozen.num_modules(); ++i) {
      const auto& m = frozen.module(i);
      frozen.B(i) = common::RandomOrthonormal(m.out_features, m.rank, rng).cast<float>();
      frozen.A(i) = common::RandomOrthonormal(m.in_features, m.rank, rng).transpose().cast<float>();
    }
    spdlog::info(
        "fed-sb: frozen B and A are random orthonormal matrices drawn from the run's seed (R "
        "starts at 0): fed_sb_init = random");
    ASSIGN_OR_RETURN(BlobRef blob,
                     store_.PutBlob(common::EncodeAdapter(frozen), BlobKind::kFrozen, 0));
    v0.blobs.push_back(std::move(blob));
  }
  ledger.versions.push_back(std::move(v0));
  RETURN_IF_ERROR(store_.SaveLedger(ledger));
  frozen_ = std::move(frozen);
  validator_ = UpdateValidator(method_, TrainedShapes(), frozen_, TaskScaling());
  round_ = 1;
  spdlog::info(
      "run {} created: base model {}, {} modules, rank {}, lora_alpha {}, {} local steps at "
      "learning rate {}",
      ledger.run_id, ledger.base_model_sha256, ledger.modules.size(), options_.rank,
      options_.lora_alpha, options_.local_steps, options_.learning_rate);
  return absl::OkStatus();
}

absl::StatusOr<v1::JoinResponse> RoundEngine::Join(const std::string& client,
                                                   const v1::JoinRequest& request,
                                                   std::string_view peer) {
  LongPolls::Ready ready;
  v1::JoinResponse response;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const std::string& expected =
        store_.has_ledger() ? store_.ledger().base_model_sha256 : options_.base_model_sha256;
    absl::Status admitted =
        CheckAdmission(request, expected, RankOf(client), {}, options_.max_client_examples);
    if (admitted.ok() && !store_.has_ledger()) admitted = InitializeRunLocked(request);
    if (admitted.ok())
      admitted = CheckAdmission(request, expected, RankOf(client), store_.ledger().modules,
                                options_.max_client_examples);
    std::string repeated;
    if (!admitted.ok()) {
      if (log_limiter_.Allow("refused " + client, env_->Now(), &repeated))
        spdlog::warn("refused {}: {}{}", client, admitted.message(), repeated);
      return admitted;
    }
    const bool is_new = clients_.Join(client, request.num_examples(), env_->Now());
    ClientInfo& info = *clients_.Find(client);
    if (is_new || log_limiter_.Allow("re-joined " + client, env_->Now(), &repeated))
      spdlog::info("{} {}{} ({} examples); {} clients joined{}", client,
                   is_new ? "joined" : "re-joined", peer.empty() ? "" : StrCat(" from ", peer),
                   request.num_examples(), clients_.size(), repeated);
    info.session = NewSessionId();
    info.peer = peer;
    response.set_session(info.session);
    MaybeStartRoundLocked();
    CollectReadyLocked(&ready, false);
    response.set_run_id(store_.ledger().run_id);
    response.set_method(std::string(MethodName(method_)));
    response.set_rounds(options_.rounds);
    response.set_max_chunk_bytes(options_.chunk_bytes);
  }
  LongPolls::Deliver(ready);
  return response;
}

absl::Status RoundEngine::CheckSession(const std::string& client, std::string_view session,
                                       std::string_view peer) {
  std::lock_guard<std::mutex> lock(mu_);
  const ClientInfo* info = clients_.Find(client);
  if (session.empty() || info == nullptr || info->session == session) return absl::OkStatus();
  if (std::string repeated; log_limiter_.Allow("superseded " + client, env_->Now(), &repeated)) {
    spdlog::warn(
        "{}: a call from {} in a session that a later join from {} superseded: two processes use "
        "{}'s certificate, or an old one still runs; it is told to stop{}",
        client, peer, info->peer, client, repeated);
  }
  const std::string message = StrCat("this session of ", client,
                                     " was superseded by a later join with the same identity from ",
                                     info->peer, "; is another process using this certificate?");
  return WithReason(absl::PermissionDeniedError(message), v1::ErrorDetail::SUPERSEDED);
}

std::string RoundEngine::RoundNameLocked() const {
  if (!InitialisingLocked()) return StrCat("round ", round_);
  const FedSbInit& init = *store_.ledger().init;
  return StrCat("fed-sb initialisation step ", init_step() + 1, " of ", init.total_steps(), " (",
                common::SketchStepName(InitStepKind(init, init_step())), ")");
}

bool RoundEngine::AnsweredLocked(const std::string& client) const {
  return uploads_.Accepted(client) || declined_.contains(client);
}

bool RoundEngine::EveryMemberAnsweredLocked() const {
  return std::all_of(cohort_.begin(), cohort_.end(),
                     [&](const std::string& id) { return AnsweredLocked(id); });
}

v1::Task RoundEngine::TaskForLocked(const std::string& client, int64_t have_version) {
  v1::Task task;
  task.set_method(std::string(MethodName(method_)));
  task.set_round(round_);
  task.set_state_version(version());
  if (phase_ == Phase::kDone) {
    task.set_kind(v1::Task::DONE);
    task.set_round(version());
    for (auto& b : DownloadsFor(store_.ledger(), have_version, version()))
      *task.add_downloads() = std::move(b);
    return task;
  }
  const bool in_cohort = std::binary_search(cohort_.begin(), cohort_.end(), client);
  if (phase_ != Phase::kTraining || !in_cohort || uploads_.Accepted(client) ||
      commit_retry_.pending) {
    task.set_kind(v1::Task::WAIT);
    task.set_note(
        phase_ == Phase::kWaitingForClients ? waiting_for_
        : !in_cohort                        ? StrCat("not in ", RoundNameLocked(), "'s cohort")
        : commit_retry_.pending
            ? StrCat(RoundNameLocked(), " is closing; its commit is being retried")
            : StrCat("answer to ", RoundNameLocked(), " accepted; waiting for it to close"));
    return task;
  }
  if (InitialisingLocked()) {
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

void RoundEngine::GetTask(const std::string& client, const v1::GetTaskRequest& request,
                          TaskCallback done) {
  absl::StatusOr<v1::Task> task;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (clients_.Find(client) == nullptr) {
      task = WithReason(
          absl::FailedPreconditionError(StrCat(client, " has not joined; call Join first")),
          v1::ErrorDetail::NOT_JOINED);
    } else {
      const auto now = env_->Now();
      clients_.Touch(client, now);
      task = TaskForLocked(client, request.have_version());
      // A poll lasts at most half the client timeout, so a client waiting for its task calls again
      // before it could count as silent.
      const int64_t wait_ms = std::clamp<int64_t>(
          request.max_wait_ms(), 0,
          std::min<int64_t>(options_.max_wait_ms,
                            static_cast<int64_t>(options_.client_timeout_s * 1000 / 2)));
      if (task->kind() == v1::Task::WAIT && wait_ms > 0 && !stopping_) {
        polls_.Add(client, request.have_version(), now + std::chrono::milliseconds(wait_ms),
                   std::move(done));
        return;
      }
    }
  }
  done(std::move(task));  // never under the lock
}

absl::StatusOr<v1::Task> RoundEngine::GetTaskBlocking(const std::string& client,
                                                      const v1::GetTaskRequest& request) {
  std::promise<absl::StatusOr<v1::Task>> promise;
  GetTask(client, request, [&](absl::StatusOr<v1::Task> t) { promise.set_value(std::move(t)); });
  return promise.get_future().get();
}

RoundEngine::TaskState RoundEngine::TaskStateLocked() const {
  return {phase_,
          round_,
          store_.has_ledger() ? version() : -1,
          InitialisingLocked() ? init_step() : -1,
          cohort_.size(),
          commit_retry_.pending};
}

void RoundEngine::CollectReadyLocked(LongPolls::Ready* ready, bool all) {
  const TaskState state = TaskStateLocked();
  const LongPolls::Scope scope = all || stopping_         ? LongPolls::Scope::kAll
                                 : state != polled_state_ ? LongPolls::Scope::kChanged
                                                          : LongPolls::Scope::kExpired;
  polled_state_ = state;
  polls_.Collect(
      [this](const std::string& client, int64_t have) { return TaskForLocked(client, have); },
      env_->Now(), scope, ready);
}

absl::StatusOr<v1::DownloadResponse> RoundEngine::Download(const std::string& client,
                                                           const v1::DownloadRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!store_.has_ledger() || !store_.ledger().HoldsBlob(request.sha256()))
    return absl::NotFoundError(StrCat("no blob ", request.sha256(), " in this run's ledger"));
  const int64_t max_bytes = request.max_bytes() > 0
                                ? std::min(request.max_bytes(), options_.chunk_bytes)
                                : options_.chunk_bytes;
  ASSIGN_OR_RETURN(auto chunk, store_.ReadBlob(request.sha256(), request.offset(), max_bytes));
  v1::DownloadResponse response;
  response.set_offset(request.offset());
  response.set_total_size(chunk.second);
  *response.mutable_data() = std::move(chunk.first);
  if (ClientInfo* info = clients_.Find(client)) {
    info->last_seen = env_->Now();
    info->bytes_down_this_round += static_cast<int64_t>(response.data().size());
  }
  return response;
}

absl::StatusOr<v1::UploadResponse> RoundEngine::Upload(const std::string& client,
                                                       const v1::UploadRequest& request) {
  bool complete = false;
  std::optional<std::vector<common::MatrixShape>> sketch;
  absl::StatusOr<v1::UploadResponse> response;
  {
    std::lock_guard<std::mutex> lock(mu_);
    clients_.Touch(client, env_->Now());
    // Late: its round (or initialisation step) closed, or is closing, before the update came.
    const bool closing = commit_retry_.pending && !uploads_.Accepted(client);
    const bool earlier_step =
        InitialisingLocked() && request.round() == 0 && request.sketch_step() < init_step();
    if (request.round() < round_ || earlier_step ||
        (request.round() == round_ && (phase_ == Phase::kDone || closing))) {
      if (late_.emplace(client, request.round()).second) {
        spdlog::warn("{}'s update for round {} came after that round closed; not counted (late)",
                     client, request.round());
      }
      return WithReason(
          absl::FailedPreconditionError(
              StrCat("round ", request.round(), " closed before this update arrived (late)",
                     phase_ == Phase::kTraining && !closing ? StrCat("; round ", round_, " is open")
                                                            : "")),
          v1::ErrorDetail::LATE);
    }
    auto stale = [](absl::Status st) { return WithReason(st, v1::ErrorDetail::STALE_TASK); };
    auto rejected = [](absl::Status st) { return WithReason(st, v1::ErrorDetail::REJECTED); };
    if (phase_ != Phase::kTraining) {
      return stale(absl::FailedPreconditionError(
          StrCat("no round is open (upload for round ", request.round(), ")")));
    }
    if (request.round() != round_) {
      return stale(absl::FailedPreconditionError(
          StrCat("upload for round ", request.round(), " but round ", round_, " is open")));
    }
    if (InitialisingLocked() && request.sketch_step() != init_step()) {
      return stale(absl::FailedPreconditionError(StrCat("answer to initialisation step ",
                                                        request.sketch_step() + 1, " but step ",
                                                        init_step() + 1, " is open")));
    }
    if (request.state_version() != version()) {
      return stale(absl::FailedPreconditionError(
          StrCat("update trained from version ", request.state_version(), " but round ", round_,
                 " trains from version ", version())));
    }
    if (!std::binary_search(cohort_.begin(), cohort_.end(), client)) {
      return stale(
          absl::PermissionDeniedError(StrCat(client, " is not in round ", round_, "'s cohort")));
    }
    if (request.total_size() <= 0)  // regression: this was "exceeds the limit"
      return rejected(absl::InvalidArgumentError(StrCat(
          "update of total size ", request.total_size(), "; an update has at least one byte")));
    if (request.total_size() > options_.max_update_bytes) {
      if (std::string repeated; log_limiter_.Allow("too large " + client, env_->Now(), &repeated))
        spdlog::warn("round {}: refused {}'s update of {} bytes (limit {}){}", round_, client,
                     request.total_size(), options_.max_update_bytes, repeated);
      return rejected(absl::ResourceExhaustedError(StrCat("update of ", request.total_size(),
                                                          " bytes exceeds the limit of ",
                                                          options_.max_update_bytes, " bytes")));
    }
    if (!common::IsSha256Hex(request.sha256())) {
      return rejected(absl::InvalidArgumentError(
          StrCat("sha256 '", request.sha256(), "' is not 64 lower-case hex digits")));
    }
    response = uploads_.Receive(round_, client, request, &complete);
    if (!response.ok() || !complete) return response;
    if (InitialisingLocked()) sketch = InitProductShapes(store_.ledger(), init_step());
  }
  // validator_ changes only at the end of round 0, before any update can come, so it is read
  // without the lock.
  return FinishUpload(client, request, validator_, sketch);
}

absl::StatusOr<v1::UploadResponse> RoundEngine::FinishUpload(
    const std::string& client, const v1::UploadRequest& request, const UpdateValidator& validator,
    const std::optional<std::vector<common::MatrixShape>>& sketch) {
  // Verified and validated before it can reach the aggregate, without holding mu_: hashing and
  // checking a 100 MB update takes a few tenths of a second that other clients need not wait for.
  const auto verify_start = std::chrono::steady_clock::now();
  const std::string part = PartName(request.round(), client);
  absl::StatusOr<Adapter> update;
  absl::StatusOr<std::vector<common::MatrixD>> products;
  if (sketch) {
    const std::string origin =
        StrCat(client, "'s answer to initialisation step ", request.sketch_step() + 1);
    absl::Status st = VerifyPart(store_, part, request.sha256(), origin, [&](std::string_view b) {
      products = common::DecodeMatrices(b, origin, *sketch);
      return products.status();
    });
    if (!st.ok()) products = st;
  } else {
    update = validator.Verify(store_, part, request.sha256(),
                              StrCat("update of ", client, " for round ", request.round()),
                              RankOf(client));
  }
  // The norm bound's figure, computed here, outside the engine's lock, as the verification is.
  double update_norm = 0;
  if (!sketch && update.ok() &&
      (options_.max_update_norm > 0 || options_.max_update_norm_ratio > 0)) {
    for (size_t i = 0; i < update->num_modules(); ++i)
      update_norm += std::pow(update->DeltaNorm(i), 2);
    update_norm = std::sqrt(update_norm);
  }
  LongPolls::Ready ready;
  v1::UploadResponse response;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const PendingUpload* up = uploads_.Find(client);
    if (phase_ != Phase::kTraining || round_ != request.round() || up == nullptr ||
        !up->verifying || sketch.has_value() != InitialisingLocked() ||
        (sketch && request.sketch_step() != init_step())) {
      return WithReason(absl::FailedPreconditionError(StrCat(
                            "round ", request.round(), " stopped waiting for ", client,
                            "'s update while it was verified (the run ended, or the client left)")),
                        v1::ErrorDetail::STALE_TASK);
    }
    absl::Status status = sketch ? products.status() : update.status();
    const int64_t joined = clients_.Find(client)->num_examples;
    const int64_t claimed = request.num_examples() > 0 ? request.num_examples() : joined;
    // Its weight in the aggregate: what it trained on, within the round's cap (floored, so the
    // cap's share bound holds). Compared as doubles, converted only when the cap is the smaller:
    // a claim near INT64_MAX is 2^63 as a double, which no int64 holds (found by the fuzzer).
    const double cap = std::floor(weight_cap_);
    const int64_t examples = std::max<int64_t>(
        1, cap < static_cast<double>(claimed) ? static_cast<int64_t>(cap) : claimed);
    if (status.ok() && claimed > joined)
      status = absl::InvalidArgumentError(StrCat("the update claims ", claimed,
                                                 " examples, more than the ", joined, " ", client,
                                                 " joined with"));
    if (status.ok() && options_.max_update_norm > 0 && update_norm > options_.max_update_norm)
      status = absl::InvalidArgumentError(StrCat("the update's norm ‖s·B·A‖_F = ", update_norm,
                                                 " exceeds the run's bound of ",
                                                 options_.max_update_norm, " (--max-update-norm)"));
    if (status.ok()) {
      const bool keep = !sketch && HoldsUpdates(method_, options_);
      status = uploads_.Accept(round_, client, examples, update_norm, request.metrics(),
                               keep ? *update : Adapter());
      if (!status.ok()) status = store_.Unavailable(StrCat(client, "'s update"), status);
      if (status.ok() && sketch) {
        if (dp_) {
          ClientDpRounds::AddSketchAnswer(*products, sketch_sums_);
        } else {
          for (size_t i = 0; i < products->size(); ++i)
            sketch_sums_[i] += static_cast<double>(examples) * (*products)[i];
          sketch_weight_ += static_cast<double>(examples);
        }
      } else if (status.ok() && dp_) {
        status = dp_->Add(*update);
      } else if (status.ok() && !keep) {
        sums_.Add(*update, static_cast<double>(examples));
      }
    }
    if (!status.ok()) {
      uploads_.Drop(round_, client);
      if (absl::IsUnavailable(status)) return status;  // the coordinator's failure: retried
      if (std::string repeated; log_limiter_.Allow("rejected " + client, env_->Now(), &repeated))
        spdlog::warn("{}: rejected {}'s update: {}{}", RoundNameLocked(), client, status.message(),
                     repeated);
      rejected_.push_back(client);
      return WithReason(status, v1::ErrorDetail::REJECTED);
    }
    response.set_received(request.total_size());
    response.set_accepted(true);
    const PendingUpload& accepted = *uploads_.Find(client);
    spdlog::info("{}: {}'s update of {} bytes verified, validated and folded in {:.3f} s",
                 RoundNameLocked(), client, accepted.total_size,
                 Seconds(std::chrono::steady_clock::now() - verify_start).count());
    spdlog::info("{}: accepted {}'s update ({} bytes, loss {:.6g} -> {:.6g}); {} of {} arrived",
                 RoundNameLocked(), client, accepted.total_size, accepted.metrics.loss_before(),
                 accepted.metrics.loss_after(), uploads_.ArrivedCount(), cohort_.size());
    if (EveryMemberAnsweredLocked()) MaybeCloseRoundLocked();
    CollectReadyLocked(&ready, false);
  }
  LongPolls::Deliver(ready);
  return response;
}

v1::HeartbeatResponse RoundEngine::Heartbeat(const std::string& client,
                                             const v1::HeartbeatRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  clients_.Touch(client, env_->Now());
  v1::HeartbeatResponse response;
  response.set_still_wanted(phase_ == Phase::kTraining && request.round() == round_ &&
                            !commit_retry_.pending &&
                            std::binary_search(cohort_.begin(), cohort_.end(), client));
  return response;
}

absl::StatusOr<v1::LeaveResponse> RoundEngine::Leave(const std::string& client,
                                                     const v1::LeaveRequest& request) {
  LongPolls::Ready ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    ClientInfo* info = clients_.Find(client);
    if (info == nullptr) {
      return WithReason(absl::FailedPreconditionError(
                            StrCat(client, " has not joined; there is nothing to leave")),
                        v1::ErrorDetail::NOT_JOINED);
    }
    if (request.reason().size() > 1024 || !common::IsUtf8(request.reason())) {
      return absl::InvalidArgumentError(StrCat("a leave reason of ", request.reason().size(),
                                               " bytes; expected up to 1024 bytes of UTF-8"));
    }
    info->left = request.reason().empty() ? "no reason given" : request.reason();
    spdlog::warn("{} left the run: {}", client, info->left);
    if (phase_ == Phase::kTraining && !commit_retry_.pending && request.round() == round_ &&
        std::binary_search(cohort_.begin(), cohort_.end(), client) && !AnsweredLocked(client)) {
      declined_[client] = info->left;
      uploads_.Drop(round_, client);
      // Nobody left to wait for: close the round now (or retry it without quorum).
      if (EveryMemberAnsweredLocked()) MaybeCloseRoundLocked();
    }
    CollectReadyLocked(&ready, false);
  }
  LongPolls::Deliver(ready);
  return v1::LeaveResponse();
}

v1::StatusResponse RoundEngine::GetStatus() {
  std::lock_guard<std::mutex> lock(mu_);
  v1::StatusResponse s;
  s.set_run_id(store_.has_ledger() ? store_.ledger().run_id : "");
  s.set_method(std::string(MethodName(method_)));
  s.set_round(phase_ == Phase::kDone ? version() : round_);
  s.set_rounds(options_.rounds);
  s.set_state_version(version());
  if (phase_ == Phase::kWaitingForClients) s.set_waiting_for(waiting_for_);
  s.set_phase(!failure_.ok()               ? "failed"
              : phase_ == Phase::kDone     ? "done"
              : commit_retry_.pending      ? "closing (retrying the commit)"
              : phase_ == Phase::kTraining ? (InitialisingLocked() ? RoundNameLocked() : "training")
                                           : "waiting for clients");
  for (const auto& id : cohort_) s.add_cohort(id);
  for (const auto& id : uploads_.ArrivedIds()) s.add_arrived(id);
  const auto now = env_->Now();
  const int64_t now_ms = env_->NowUnixMs();
  for (const auto& [id, info] : clients_.all()) {
    v1::ClientStatus* c = s.add_clients();
    c->set_id(id);
    c->set_num_examples(info.num_examples);
    c->set_last_seen_unix_ms(
        now_ms -
        std::chrono::duration_cast<std::chrono::milliseconds>(now - info.last_seen).count());
    c->set_rounds_contributed(info.rounds_contributed);
  }
  return s;
}

}  // namespace fedlora::server
