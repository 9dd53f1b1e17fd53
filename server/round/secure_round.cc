#include "server/round/secure_round.h"

#include <spdlog/spdlog.h>

#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/secagg/crypto.h"
#include "common/secagg/quantise.h"

namespace fedlora::server {
namespace {

using common::StrCat;

}  // namespace

absl::StatusOr<std::unique_ptr<SecureRound>> SecureRound::Open(
    const ServerOptions& options, Plan plan, std::shared_ptr<const secagg::PeerVerifier> verifier) {
  const int n = static_cast<int>(plan.cohort.size());
  ASSIGN_OR_RETURN(const secagg::GraphParams graph,
                   secagg::ChooseGraph(n, options.secagg_dropout, options.secagg_corrupt));
  // The change clipped to change_clip, times a weight ≤ 1.
  ASSIGN_OR_RETURN(
      const secagg::Quantisation q,
      secagg::PlanQuantisation(plan.length, plan.change_clip, plan.noise_multiplier, n, n));
  v1::SecAggConfig c;
  ASSIGN_OR_RETURN(const std::string nonce, secagg::RandomBytes(8));
  uint64_t tag = 0;
  for (unsigned char b : nonce) tag = tag << 8 | b;
  c.set_instance(fmt::format("{}/round-{}/attempt-{}/{:016x}", plan.run_id, plan.round,
                             plan.attempt + 1, tag));
  for (const std::string& id : plan.cohort) c.add_cohort(id);
  c.set_neighbours(graph.neighbours);
  c.set_threshold(graph.threshold);
  ASSIGN_OR_RETURN(*c.mutable_ring_seed(), secagg::RandomBytes(32));
  ASSIGN_OR_RETURN(*c.mutable_rotation_seed(), secagg::RandomBytes(32));
  secagg::SetQuantisation(q, c);
  c.set_change_clip(plan.change_clip);
  c.set_weight_cap(plan.weight_cap);
  c.set_unit_norm(plan.unit_norm);
  ASSIGN_OR_RETURN(secagg::ServerSession session, secagg::ServerSession::Create(c, *verifier));
  spdlog::info(
      "{}: secure aggregation over {} clients: each shares its secrets with {} neighbours{}, any "
      "{} of the {} holders unmask it ({} may drop); {}",
      plan.name, n, graph.neighbours, graph.complete() ? " (all)" : " on a ring", graph.threshold,
      graph.neighbours + 1, graph.tolerated(), q.Describe());
  return std::unique_ptr<SecureRound>(new SecureRound(std::move(c), graph, std::move(session)));
}

std::string_view SecureRound::StepName() const {
  static constexpr std::string_view kNames[] = {"keys",    "shares",    "masked input",
                                                "consent", "unmasking", "done"};
  return kNames[static_cast<int>(step_)];
}

int64_t SecureRound::masked_bytes() const {
  return static_cast<int64_t>(secagg::PackedBytes(session_.instance().words(), config_.bits()));
}

bool SecureRound::Waits(const std::string& client) const {
  return step_ != Step::kDone && session_.Stage(client) == static_cast<int>(step_);
}

std::optional<v1::SecAggStep> SecureRound::StepFor(const std::string& client) const {
  if (step_ == Step::kKeys || !Waits(client)) return std::nullopt;
  v1::SecAggStep s;
  s.set_instance(config_.instance());
  absl::Status st;
  switch (step_) {
    case Step::kShares:
      if (auto r = session_.RosterFor(client); r.ok())
        *s.mutable_roster() = *std::move(r);
      else
        st = r.status();
      break;
    case Step::kInput:
      if (auto r = session_.InboxFor(client); r.ok())
        *s.mutable_inbox() = *std::move(r);
      else
        st = r.status();
      break;
    case Step::kConsent:
      *s.mutable_survivors() = session_.Survivors();
      break;
    case Step::kUnmask:
      if (auto r = session_.ConsentsFor(client); r.ok())
        *s.mutable_consents() = *std::move(r);
      else
        st = r.status();
      break;
    default:
      return std::nullopt;
  }
  if (!st.ok()) return std::nullopt;
  return s;
}

absl::Status SecureRound::Receive(const std::string& client, const std::string& certificate,
                                  const v1::SecAggRequest& request) {
  if (request.instance() != config_.instance())
    return absl::FailedPreconditionError(
        StrCat(client, " answered another secure aggregation instance than the open one (",
               config_.instance(), ")"));
  switch (request.step_case()) {
    case v1::SecAggRequest::kKeys: {
      v1::SecAggKeys keys = request.keys();
      keys.set_certificate(certificate);
      return session_.AddKeys(client, std::move(keys));
    }
    case v1::SecAggRequest::kShares:
      return session_.AddShares(client, request.shares());
    case v1::SecAggRequest::kConsent:
      return session_.AddConsent(client, request.consent());
    case v1::SecAggRequest::kReveal:
      return session_.AddReveal(client, request.reveal());
    default:
      return absl::InvalidArgumentError(StrCat(client, " sent an empty secure aggregation step"));
  }
}

bool SecureRound::Took(const std::string& client, const v1::SecAggRequest& request) const {
  int stage = 0;  // the one this message completes (ServerSession::Stage)
  switch (request.step_case()) {
    case v1::SecAggRequest::kKeys:
      stage = 1;
      break;
    case v1::SecAggRequest::kShares:
      stage = 2;
      break;
    case v1::SecAggRequest::kConsent:
      stage = 4;
      break;
    case v1::SecAggRequest::kReveal:
      stage = 5;
      break;
    default:
      return false;
  }
  return request.instance() == config_.instance() && session_.Stage(client) >= stage;
}

absl::Status SecureRound::Advance(const std::vector<AcceptedUpdate>& inputs,
                                  const StateStore& store) {
  switch (step_) {
    case Step::kKeys:
      RETURN_IF_ERROR(session_.CloseKeys());
      break;
    case Step::kShares:
      RETURN_IF_ERROR(session_.CloseShares());
      senders_ = session_.AtLeast(2);
      break;
    case Step::kInput: {
      for (const AcceptedUpdate& u : inputs) {  // in client order
        ASSIGN_OR_RETURN(const std::string bytes, store.ReadWholeBlob(u.sha256));
        ASSIGN_OR_RETURN(const std::vector<uint64_t> words,
                         secagg::UnpackWords(bytes, config_.bits(), session_.instance().words()));
        RETURN_IF_ERROR(session_.AddMaskedInput(u.client, words));
      }
      RETURN_IF_ERROR(session_.CloseInputs());
      break;
    }
    case Step::kConsent:
      RETURN_IF_ERROR(session_.CloseConsents());
      break;
    case Step::kUnmask: {
      ASSIGN_OR_RETURN(const std::vector<uint64_t> words, session_.Finish());
      ASSIGN_OR_RETURN(sum_, secagg::Decode(words, config_));
      survivors_ = session_.AtLeast(3);
      break;
    }
    case Step::kDone:
      return absl::FailedPreconditionError("the secure aggregation round is done");
  }
  step_ = static_cast<Step>(static_cast<int>(step_) + 1);
  return absl::OkStatus();
}

}  // namespace fedlora::server
