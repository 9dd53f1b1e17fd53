#include "server/round/engine.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <future>
#include <random>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/gguf_export.h"
#include "common/net/wire.h"
#include "server/errors.h"

namespace fedlora::server {
namespace {

using common::StrCat;
using Seconds = std::chrono::duration<double>;

// 128 random bits in hex: a session id that no other join, of this process or an earlier one, has.
std::string NewSessionId() {
  std::random_device random;
  return fmt::format("{:08x}{:08x}{:08x}{:08x}", random(), random(), random(), random());
}

// The answer to any call of a client the coordinator removed from the run (`why`).
absl::Status Removed(const std::string& client, const std::string& why) {
  return WithReason(absl::PermissionDeniedError(StrCat(client, " was ", why)),
                    v1::ErrorDetail::REMOVED);
}

void LogClientDp(const ServerOptions& o) {
  spdlog::info(
      "client-level DP: updates clipped to {} ({}), noise multiplier {}, delta {}{}; every client "
      "weighs the same and the divisor is the cohort drawn",
      o.dp_clip, o.dp_adaptive_clip ? "adaptive, initial" : "fixed", o.dp_noise_multiplier,
      o.dp_delta, o.dp_target_epsilon > 0 ? StrCat(", target epsilon ", o.dp_target_epsilon) : "");
  if (o.dp_noise_multiplier == 0)
    spdlog::warn("client-level DP without noise: updates are clipped, but epsilon is infinite");
  if (o.max_update_norm_ratio > 0)
    spdlog::info("--max-update-norm-ratio {} is not applied: the DP clip bounds every update",
                 o.max_update_norm_ratio);
}

}  // namespace

absl::StatusOr<std::unique_ptr<RoundEngine>> RoundEngine::Create(
    const ServerOptions& given, common::Env* env, std::unique_ptr<Evaluator> evaluator) {
  RETURN_IF_ERROR(given.Validate());
  ServerOptions options = given;
  if (evaluator == nullptr && !options.base_model_dir.empty()) {
    ASSIGN_OR_RETURN(evaluator, Evaluator::Load(options));
    // A model llama.cpp cannot take is refused now, not at the end of the run.
    if (!options.export_gguf.empty())
      RETURN_IF_ERROR(common::CheckGgufExport(options.base_model_dir));
  }
  if (evaluator != nullptr) options.base_model_sha256 = evaluator->fingerprint();
  ASSIGN_OR_RETURN(StateStore store, StateStore::Open(options.state_dir, env));
  std::unique_ptr<RoundEngine> e(new RoundEngine(options, env, std::move(store)));
  if (options.client_dp()) {
    ASSIGN_OR_RETURN(e->dp_, ClientDp::Create(e->options_));
    LogClientDp(options);
  }
  if (options.secure()) {
    ASSIGN_OR_RETURN(const std::string ca, common::ReadFileToString(options.client_ca));
    auto verifier = secagg::PeerVerifier::FromCaPem(ca);
    if (!verifier.ok())
      return absl::InvalidArgumentError(
          StrCat("client_ca ", options.client_ca, ": ", verifier.status().message()));
    e->verifier_ = std::make_shared<const secagg::PeerVerifier>(*std::move(verifier));
    spdlog::info(
        "secure aggregation (SecAgg+): the coordinator sees only masked inputs and their sum; "
        "clients clip their change to {} (flat L2){}; dropout {}, corrupt {}",
        options.client_dp() ? options.dp_clip : options.secagg_clip,
        options.client_dp() ? " and add the DP noise themselves" : "", options.secagg_dropout,
        options.secagg_corrupt);
  }
  absl::MutexLock lock(&e->mu_);
  ASSIGN_OR_RETURN(e->follow_up_, FollowUp::Start(&e->options_, &e->store_, std::move(evaluator),
                                                  env, e->view_.get()));
  e->lifecycle_ = std::make_unique<Lifecycle>(
      e->options_, env,
      Lifecycle::Parts{&e->store_, &e->clients_, &e->uploads_, e->dp_.get(), e->follow_up_.get(),
                       &e->log_limiter_, e->view_.get(), e->verifier_});
  RETURN_IF_ERROR(e->lifecycle_->Resume());
  return e;
}

RoundEngine::RoundEngine(const ServerOptions& options, common::Env* env, StateStore store)
    : options_(options),
      env_(env),
      view_(std::make_shared<RunView>(options.Settings(), options.client_timeout_s)),
      store_(std::move(store)),
      uploads_(&store_) {}

RoundEngine::~RoundEngine() {
  // The follow-up's thread reads the store: it stops first.
  follow_up_.reset();
}

void RoundEngine::Shutdown() {
  LongPolls::Ready ready;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    CollectReadyLocked(&ready, /*all=*/true);
  }
  LongPolls::Deliver(ready);
}

bool RoundEngine::done() {
  {
    absl::MutexLock lock(&mu_);
    if (lifecycle_->phase() != Lifecycle::Phase::kDone) return false;
  }
  return follow_up_->Finished();
}

absl::Status RoundEngine::failed() {
  {
    absl::MutexLock lock(&mu_);
    if (!lifecycle_->failure().ok()) return lifecycle_->failure();
  }
  return follow_up_->failed();
}

absl::StatusOr<v1::JoinResponse> RoundEngine::Join(const std::string& client,
                                                   const v1::JoinRequest& request,
                                                   std::string_view peer) {
  LongPolls::Ready ready;
  v1::JoinResponse response;
  {
    absl::MutexLock lock(&mu_);
    if (const std::string* why = clients_.RemovedWhy(client)) return Removed(client, *why);
    const std::string& expected =
        store_.has_ledger() ? store_.ledger().base_model_sha256 : options_.base_model_sha256;
    const int rank = lifecycle_->RankOf(client);
    absl::Status admitted =
        CheckAdmission(request, expected, rank, {}, options_.max_client_examples);
    if (admitted.ok() && !store_.has_ledger()) admitted = lifecycle_->CreateRun(request);
    if (admitted.ok())
      admitted = CheckAdmission(request, expected, rank, store_.ledger().modules,
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
    lifecycle_->MaybeStart();
    CollectReadyLocked(&ready, false);
    response.set_run_id(store_.ledger().run_id);
    response.set_method(common::ToWire(options_.method));
    response.set_rounds(options_.rounds);
    response.set_max_chunk_bytes(options_.chunk_bytes);
  }
  LongPolls::Deliver(ready);
  return response;
}

absl::Status RoundEngine::CheckSession(const std::string& client, std::string_view session,
                                       std::string_view peer) {
  absl::MutexLock lock(&mu_);
  if (const std::string* why = clients_.RemovedWhy(client)) return Removed(client, *why);
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

void RoundEngine::GetTask(const std::string& client, const v1::GetTaskRequest& request,
                          TaskCallback done) {
  absl::StatusOr<v1::Task> task;
  {
    absl::MutexLock lock(&mu_);
    if (clients_.Find(client) == nullptr) {
      task = WithReason(
          absl::FailedPreconditionError(StrCat(client, " has not joined; call Join first")),
          v1::ErrorDetail::NOT_JOINED);
    } else {
      const auto now = env_->Now();
      clients_.Touch(client, now);
      task = lifecycle_->TaskFor(client, request.have_version());
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

void RoundEngine::CollectReadyLocked(LongPolls::Ready* ready, bool all) {
  const Lifecycle::TaskState state = lifecycle_->State();
  const LongPolls::Scope scope = all || stopping_         ? LongPolls::Scope::kAll
                                 : state != polled_state_ ? LongPolls::Scope::kChanged
                                                          : LongPolls::Scope::kExpired;
  polled_state_ = state;
  polls_.Collect(
      [this](const std::string& client, int64_t have) ABSL_NO_THREAD_SAFETY_ANALYSIS {
        return lifecycle_->TaskFor(client, have);  // Collect runs under mu_
      },
      env_->Now(), scope, ready);
}

absl::StatusOr<v1::DownloadResponse> RoundEngine::Download(const std::string& client,
                                                           const v1::DownloadRequest& request) {
  absl::MutexLock lock(&mu_);
  const std::string* in_memory = lifecycle_->RoundBlob(client, request.sha256());
  if (in_memory == nullptr &&
      (!store_.has_ledger() || !store_.ledger().HoldsBlob(request.sha256())))
    return absl::NotFoundError(StrCat("no blob ", request.sha256(), " in this run's ledger"));
  const int64_t max_bytes = request.max_bytes() > 0
                                ? std::min(request.max_bytes(), options_.chunk_bytes)
                                : options_.chunk_bytes;
  std::pair<std::string, int64_t> chunk;
  if (in_memory != nullptr) {
    const auto size = static_cast<int64_t>(in_memory->size());
    if (request.offset() < 0 || request.offset() > size)
      return absl::OutOfRangeError(
          StrCat("offset ", request.offset(), " is outside the blob's ", size, " bytes"));
    chunk = {
        in_memory->substr(static_cast<size_t>(request.offset()), static_cast<size_t>(max_bytes)),
        size};
  } else {
    ASSIGN_OR_RETURN(chunk, store_.ReadBlob(request.sha256(), request.offset(), max_bytes));
  }
  v1::DownloadResponse response;
  response.set_offset(request.offset());
  response.set_total_size(chunk.second);
  *response.mutable_data() = std::move(chunk.first);
  if (ClientInfo* info = clients_.Find(client)) {
    info->last_seen = env_->Now();
    info->bytes_down_this_round += static_cast<int64_t>(response.data().size());
    info->bytes_down += static_cast<int64_t>(response.data().size());
  }
  return response;
}

absl::Status RoundEngine::Refuse(const std::string& client, const Verdict& verdict,
                                 LongPolls::Ready* ready) {
  const std::string kind = StrCat(static_cast<int>(verdict.reason), " ", client);
  if (std::string repeated; log_limiter_.Allow("refused upload " + kind, env_->Now(), &repeated))
    spdlog::warn("{}: rejected {}'s update: {}{}", lifecycle_->RoundName(), client,
                 verdict.status.message(), repeated);
  lifecycle_->Rejected(client, verdict.status.message());
  view_->CountRejected(verdict.kind);
  const std::string* why = clients_.RemovedWhy(client);
  if (why == nullptr) return verdict.ToStatus();
  CollectReadyLocked(ready, false);  // its leaving may close the round
  return Removed(client, *why);      // that was its last: it stops now
}

absl::StatusOr<v1::UploadResponse> RoundEngine::Upload(const std::string& client,
                                                       const v1::UploadRequest& request) {
  std::shared_ptr<const UpdateGate> gate;
  Sender sender{client};
  LongPolls::Ready ready;
  absl::StatusOr<v1::UploadResponse> response;
  bool complete = false;
  {
    absl::MutexLock lock(&mu_);
    // Removed between the session check and here: nothing of it is taken.
    if (const std::string* why = clients_.RemovedWhy(client)) return Removed(client, *why);
    clients_.Touch(client, env_->Now());
    ClientInfo* info = clients_.Find(client);
    if (info != nullptr) sender.joined = info->num_examples;
    sender.rank = lifecycle_->RankOf(client);
    sender.accepted = uploads_.Accepted(client);
    gate = lifecycle_->gate();
    Verdict verdict =
        UpdateGate::Admit(lifecycle_->View(), sender, request,
                          gate ? gate->MaxBytes(sender.rank) : options_.max_update_bytes);
    if (verdict.ok()) {
      response = uploads_.Receive(lifecycle_->round(), client, request, &complete);
      if (response.ok() && info != nullptr)
        info->bytes_up += static_cast<int64_t>(request.data().size());
      if (const auto detail = DetailOf(response.status()))
        verdict = Verdict::Refused(detail->reason(), response.status(), "chunk");
    } else {
      if (verdict.reason == v1::ErrorDetail::LATE) lifecycle_->Late(client, request.round());
      response = verdict.ToStatus();
    }
    // A malformed upload is a strike, unless the sender's update of the round was accepted
    // already: that one is aggregated, whatever a repeat of it says.
    if (verdict.reason == v1::ErrorDetail::REJECTED && !sender.accepted)
      response = Refuse(client, verdict, &ready);
  }
  LongPolls::Deliver(ready);
  if (!response.ok() || !complete) return response;
  return FinishUpload(client, request, std::move(gate), sender);
}

absl::StatusOr<v1::UploadResponse> RoundEngine::FinishUpload(const std::string& client,
                                                             const v1::UploadRequest& request,
                                                             std::shared_ptr<const UpdateGate> gate,
                                                             const Sender& sender) {
  // Checked outside the engine's lock: hashing and decoding a 100 MB update takes a few tenths of
  // a second that other clients need not wait for. The gate never changes, and the part file
  // stays still while it is `verifying`.
  const auto start = std::chrono::steady_clock::now();
  CheckedUpdate checked;
  const Verdict verdict = gate->Check(sender, request, PartName(request.round(), client), &checked);
  LongPolls::Ready ready;
  absl::StatusOr<v1::UploadResponse> response = v1::UploadResponse();
  {
    absl::MutexLock lock(&mu_);
    if (const std::string* why = clients_.RemovedWhy(client)) return Removed(client, *why);
    const PendingUpload* up = uploads_.Find(client);
    if (lifecycle_->gate() != gate || up == nullptr || !up->verifying) {
      return WithReason(absl::FailedPreconditionError(StrCat(
                            "round ", request.round(), " stopped waiting for ", client,
                            "'s update while it was verified (the run ended, or the client left)")),
                        v1::ErrorDetail::STALE_TASK);
    }
    absl::Status status = verdict.status;
    if (status.ok()) {
      status = uploads_.Accept(lifecycle_->round(), client, checked.weight, checked.norm,
                               request.metrics());
      if (!status.ok()) status = store_.Unavailable(StrCat(client, "'s update"), status);
    }
    if (!status.ok()) {
      uploads_.Drop(lifecycle_->round(), client);
      if (absl::IsUnavailable(status)) return status;  // the coordinator's failure: retried
      response = Refuse(client, verdict, &ready);
    } else {
      response->set_received(request.total_size());
      response->set_accepted(true);
      spdlog::info(
          "{}: {}'s update of {} bytes verified and validated in {:.3f} s (loss {:.6g} -> "
          "{:.6g})",
          lifecycle_->RoundName(), client, request.total_size(),
          Seconds(std::chrono::steady_clock::now() - start).count(),
          request.metrics().loss_before(), request.metrics().loss_after());
      lifecycle_->Accepted(client);
      CollectReadyLocked(&ready, false);
    }
  }
  LongPolls::Deliver(ready);
  return response;
}

v1::HeartbeatResponse RoundEngine::Heartbeat(const std::string& client,
                                             const v1::HeartbeatRequest& request) {
  absl::MutexLock lock(&mu_);
  clients_.Touch(client, env_->Now());
  v1::HeartbeatResponse response;
  response.set_still_wanted(lifecycle_->StillWanted(client, request.round()));
  return response;
}

absl::StatusOr<v1::SecAggResponse> RoundEngine::SecAgg(const std::string& client,
                                                       const std::string& certificate,
                                                       const v1::SecAggRequest& request) {
  LongPolls::Ready ready;
  {
    absl::MutexLock lock(&mu_);
    if (const std::string* why = clients_.RemovedWhy(client)) return Removed(client, *why);
    clients_.Touch(client, env_->Now());
    absl::Status st = lifecycle_->SecAgg(client, certificate, request);
    if (!st.ok()) {
      if (std::string repeated; log_limiter_.Allow("secagg " + client, env_->Now(), &repeated))
        spdlog::warn("{}: refused {}'s secure aggregation step: {}{}", lifecycle_->RoundName(),
                     client, st.message(), repeated);
      return st;
    }
    CollectReadyLocked(&ready, false);
  }
  LongPolls::Deliver(ready);
  return v1::SecAggResponse();
}

absl::StatusOr<v1::LeaveResponse> RoundEngine::Leave(const std::string& client,
                                                     const v1::LeaveRequest& request) {
  LongPolls::Ready ready;
  {
    absl::MutexLock lock(&mu_);
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
    lifecycle_->Leave(client, request.round(), info->left);
    CollectReadyLocked(&ready, false);
  }
  LongPolls::Deliver(ready);
  return v1::LeaveResponse();
}

v1::StatusResponse RoundEngine::GetStatus() {
  v1::StatusResponse s;
  s.set_follow_up(follow_up_->Describe());
  absl::MutexLock lock(&mu_);
  lifecycle_->FillStatus(s);
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
    c->set_rejected_updates(info.rejected_updates);
    c->set_bytes_up(info.bytes_up);
    c->set_bytes_down(info.bytes_down);
    c->set_left(info.left);
    if (const std::string* why = clients_.RemovedWhy(id)) c->set_removed(*why);
  }
  for (const auto& [id, why] : clients_.removed()) {  // removed in an earlier process
    if (clients_.Find(id) != nullptr) continue;
    v1::ClientStatus* c = s.add_clients();
    c->set_id(id);
    c->set_removed(why);
  }
  return s;
}

void RoundEngine::Evict(const std::string& client, const std::string& reason) {
  LongPolls::Ready ready;
  {
    absl::MutexLock lock(&mu_);
    ClientInfo* info = clients_.Find(client);
    if (info == nullptr) return;
    info->left = reason;
    lifecycle_->Leave(client, lifecycle_->round(), reason);
    CollectReadyLocked(&ready, /*all=*/true);
  }
  LongPolls::Deliver(ready);
}

absl::StatusOr<std::string> RoundEngine::Remove(const std::string& client, const std::string& by,
                                                const std::string& reason) {
  LongPolls::Ready ready;
  const std::string why = StrCat(Lifecycle::kOperatorRemoval, by, ": ", reason);
  {
    absl::MutexLock lock(&mu_);
    if (const std::string* earlier = clients_.RemovedWhy(client))
      return absl::FailedPreconditionError(StrCat(client, " was ", *earlier));
    if (lifecycle_->phase() == Lifecycle::Phase::kDone)
      return absl::FailedPreconditionError("the run is over: there is nothing to remove from");
    // Only a client that joined: a name that never did would lower the clients a restarted run
    // waits for. One that has not joined is kept out by the allow-list.
    if (clients_.Find(client) == nullptr) {
      return absl::NotFoundError(
          StrCat(client,
                 " has not joined since the coordinator started; to keep out a site that "
                 "has not joined, take it off allowed-clients (SIGHUP)"));
    }
    if (absl::Status st = store_.AddOperatorRemoval(client, why); !st.ok())
      return store_.Unavailable(StrCat(client, "'s removal"), st);
    spdlog::warn("{}: {}", client, why);
    lifecycle_->Remove(client, why);
    CollectReadyLocked(&ready, /*all=*/true);
  }
  LongPolls::Deliver(ready);
  return StrCat(client, " was ", why);
}

absl::StatusOr<std::string> RoundEngine::Pause(bool paused, const std::string& by) {
  LongPolls::Ready ready;
  std::string done;
  {
    absl::MutexLock lock(&mu_);
    if (lifecycle_->phase() == Lifecycle::Phase::kDone)
      return absl::FailedPreconditionError("the run is over: there is no round loop to pause");
    if (lifecycle_->paused() == paused)
      return absl::FailedPreconditionError(paused ? "the round loop is paused already"
                                                  : "the round loop is not paused");
    done = paused ? StrCat("paused by operator ", by,
                           ": no round opens until an operator resumes (the open one goes on)")
                  : StrCat("resumed by operator ", by);
    lifecycle_->Pause(paused, done);
    CollectReadyLocked(&ready, false);
  }
  LongPolls::Deliver(ready);
  return done;
}

void RoundEngine::Tick() {
  LongPolls::Ready ready;
  {
    absl::MutexLock lock(&mu_);
    lifecycle_->Tick();
    CollectReadyLocked(&ready, false);
  }
  LongPolls::Deliver(ready);
}

}  // namespace fedlora::server
