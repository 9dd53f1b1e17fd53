#include "server/coordinator_service.h"

#include <spdlog/spdlog.h>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/net/certs.h"
#include "common/net/tls.h"
#include "server/errors.h"

namespace fedlora::server {
namespace {

// Finishes `reactor` with `status`, or with the value (copied into `out`) when OK.
template <typename T>
grpc::ServerUnaryReactor* Reply(grpc::CallbackServerContext* context, absl::StatusOr<T> result,
                                T* out) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  if (result.ok()) {
    *out = *std::move(result);
    reactor->Finish(grpc::Status::OK);
  } else {
    reactor->Finish(ToGrpc(result.status()));
  }
  return reactor;
}

}  // namespace

grpc::Status ToGrpc(const absl::Status& status) {
  const std::optional<v1::ErrorDetail> detail = DetailOf(status);
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()),
                      detail ? detail->SerializeAsString() : std::string());
}

absl::StatusOr<std::string> CoordinatorService::Identify(grpc::CallbackServerContext* context,
                                                         Caller caller) {
  if (!mutual_tls_) {
    if (caller == Caller::kAdmin) {
      return absl::PermissionDeniedError(
          "operator actions need mutual TLS and an operator list (--client-ca, --operators)");
    }
    // Without mutual TLS nothing authenticates a client: take the name it gives (plaintext
    // experiments only).
    const auto& metadata = context->client_metadata();
    const auto it = metadata.find(common::kClientIdMetadata);
    if (it != metadata.end())
      return "insecure:" + std::string(it->second.data(), it->second.size());
    return common::StrCat("peer ", context->peer());
  }
  const auto auth = context->auth_context();
  const auto names =
      auth ? auth->FindPropertyValues("x509_common_name") : std::vector<grpc::string_ref>{};
  if (!auth || !auth->IsPeerAuthenticated() || names.empty()) {
    return absl::UnauthenticatedError(
        "a client certificate signed by the run's client CA is required");
  }
  std::string id(names[0].data(), names[0].size());
  const auto Refuse = [&](const std::string& key, const std::string& log,
                          absl::Status status) -> absl::Status {
    Warn(key + " " + id, common::StrCat("refused ", id, " (", context->peer(), "): ", log));
    return status;
  };
  std::shared_ptr<const common::RevocationList> crl;
  {
    absl::MutexLock lock(&membership_mu_);
    crl = membership_.crl;
  }
  // Read outside the lock every call takes.
  std::optional<common::CertificateId> cert;
  if (crl != nullptr || pins_ != nullptr || caller == Caller::kJoin) {
    const auto pem = auth->FindPropertyValues(GRPC_X509_PEM_CERT_PROPERTY_NAME);
    auto described =
        pem.empty() ? absl::InvalidArgumentError("no certificate")
                    : common::IdentifyCertificate(std::string_view(pem[0].data(), pem[0].size()));
    if (!described.ok())
      return absl::UnauthenticatedError(
          common::StrCat("the client certificate cannot be read: ", described.status().message()));
    cert = *std::move(described);
  }
  if (crl != nullptr && crl->Revoked(*cert)) {
    return Refuse(
        "revoked",
        common::StrCat("certificate serial ", cert->serial, " is revoked by ", crl->file()),
        WithReason(absl::PermissionDeniedError(common::StrCat(
                       id, "'s certificate (serial ", cert->serial,
                       ") is revoked by the coordinator's CRL; the site needs a new one")),
                   v1::ErrorDetail::CERTIFICATE));
  }
  bool is_operator = false;
  {
    absl::MutexLock lock(&membership_mu_);
    const Membership& m = membership_;
    is_operator = m.operators.contains(id);
    if (caller == Caller::kAdmin || (caller == Caller::kStatus && !m.operators.empty())) {
      if (!is_operator) {
        const std::string what =
            caller == Caller::kAdmin ? "act on the run" : "ask for the run's status";
        return Refuse(
            "operator", common::StrCat("may not ", what, ": not on the operator list"),
            absl::PermissionDeniedError(common::StrCat("identity '", id, "' may not ", what,
                                                       ": it is not an operator (--operators)")));
      }
    } else if (is_operator) {
      return Refuse("operator", "an operator identity cannot take part",
                    absl::PermissionDeniedError(
                        common::StrCat("identity '", id,
                                       "' is an operator (--operators): it may ask for the "
                                       "status and act on the run, not train")));
    } else if (!m.allowed.empty() && !m.allowed.contains(id)) {
      return Refuse("allow", "not on the allow-list",
                    absl::PermissionDeniedError(
                        common::StrCat("client identity '", id, "' is not on the allow-list")));
    }
  }
  // A client is pinned at its first join, an operator at its first call: so that whoever can
  // make certificates cannot make an operator's to unpin a client.
  if (pins_ != nullptr) {
    if (absl::Status st = pins_->Check(id, cert->sha256, caller == Caller::kJoin || is_operator);
        !st.ok())
      return Refuse("pinned", std::string(st.message()), st);
  }
  if (caller == Caller::kJoin) {
    absl::MutexLock lock(&membership_mu_);
    // A SIGHUP's CRL installed since the check above has not seen this join: check it here, where
    // a later one will see it in joined_with_.
    if (membership_.crl != nullptr && membership_.crl != crl && membership_.crl->Revoked(*cert))
      return absl::PermissionDeniedError(
          common::StrCat(id, "'s certificate (serial ", cert->serial, ") was just revoked"));
    joined_with_[id] = *cert;
  }
  return id;
}

bool CoordinatorService::IsOperator(std::string_view pem) {
  const absl::StatusOr<common::CertificateId> cert = common::IdentifyCertificate(pem);
  if (!cert.ok()) return false;
  {
    absl::MutexLock lock(&membership_mu_);
    if (!membership_.operators.contains(cert->cn)) return false;
    if (membership_.crl != nullptr && membership_.crl->Revoked(*cert)) return false;
  }
  return pins_ == nullptr || pins_->Check(cert->cn, cert->sha256, /*join=*/true).ok();
}

std::map<std::string, std::string> CoordinatorService::SetMembership(Membership membership) {
  absl::MutexLock lock(&membership_mu_);
  membership_ = std::move(membership);
  std::map<std::string, std::string> revoked;
  if (membership_.crl == nullptr) return revoked;
  for (const auto& [id, cert] : joined_with_) {
    if (membership_.crl->Revoked(cert))
      revoked[id] = common::StrCat("its certificate (serial ", cert.serial, ") was revoked");
  }
  return revoked;
}

void CoordinatorService::Warn(const std::string& key, const std::string& message) const {
  absl::MutexLock lock(&log_mu_);
  if (std::string repeated; log_limiter_.Allow(key, common::LogLimiter::Clock::now(), &repeated))
    spdlog::warn("{}{}", message, repeated);
}

absl::StatusOr<std::string> CoordinatorService::IdentifySession(
    grpc::CallbackServerContext* context) {
  ASSIGN_OR_RETURN(std::string id, Identify(context));
  const auto& metadata = context->client_metadata();
  const auto it = metadata.find(common::kSessionMetadata);
  const std::string_view session = it == metadata.end()
                                       ? std::string_view()
                                       : std::string_view(it->second.data(), it->second.size());
  RETURN_IF_ERROR(engine_->CheckSession(id, session, context->peer()));
  return id;
}

grpc::ServerUnaryReactor* CoordinatorService::Join(grpc::CallbackServerContext* context,
                                                   const v1::JoinRequest* request,
                                                   v1::JoinResponse* response) {
  auto id = Identify(context, Caller::kJoin);
  if (!id.ok()) return Reply<v1::JoinResponse>(context, id.status(), response);
  return Reply(context, engine_->Join(*id, *request, context->peer()), response);
}

grpc::ServerUnaryReactor* CoordinatorService::GetTask(grpc::CallbackServerContext* context,
                                                      const v1::GetTaskRequest* request,
                                                      v1::Task* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  auto id = IdentifySession(context);
  if (!id.ok()) {
    reactor->Finish(ToGrpc(id.status()));
    return reactor;
  }
  engine_->GetTask(*id, *request, [reactor, response](absl::StatusOr<v1::Task> task) {
    if (!task.ok()) {
      reactor->Finish(ToGrpc(task.status()));
      return;
    }
    *response = *std::move(task);
    reactor->Finish(grpc::Status::OK);
  });
  return reactor;
}

grpc::ServerUnaryReactor* CoordinatorService::Download(grpc::CallbackServerContext* context,
                                                       const v1::DownloadRequest* request,
                                                       v1::DownloadResponse* response) {
  auto id = IdentifySession(context);
  if (!id.ok()) return Reply<v1::DownloadResponse>(context, id.status(), response);
  return Reply(context, engine_->Download(*id, *request), response);
}

grpc::ServerUnaryReactor* CoordinatorService::Upload(grpc::CallbackServerContext* context,
                                                     const v1::UploadRequest* request,
                                                     v1::UploadResponse* response) {
  auto id = IdentifySession(context);
  if (!id.ok()) return Reply<v1::UploadResponse>(context, id.status(), response);
  return Reply(context, engine_->Upload(*id, *request), response);
}

grpc::ServerUnaryReactor* CoordinatorService::Heartbeat(grpc::CallbackServerContext* context,
                                                        const v1::HeartbeatRequest* request,
                                                        v1::HeartbeatResponse* response) {
  auto id = IdentifySession(context);
  if (!id.ok()) return Reply<v1::HeartbeatResponse>(context, id.status(), response);
  return Reply<v1::HeartbeatResponse>(context, engine_->Heartbeat(*id, *request), response);
}

grpc::ServerUnaryReactor* CoordinatorService::GetStatus(grpc::CallbackServerContext* context,
                                                        const v1::StatusRequest*,
                                                        v1::StatusResponse* response) {
  auto id = Identify(context, Caller::kStatus);
  if (!id.ok()) return Reply<v1::StatusResponse>(context, id.status(), response);
  return Reply<v1::StatusResponse>(context, engine_->GetStatus(), response);
}

grpc::ServerUnaryReactor* CoordinatorService::SecAgg(grpc::CallbackServerContext* context,
                                                     const v1::SecAggRequest* request,
                                                     v1::SecAggResponse* response) {
  auto id = IdentifySession(context);
  if (!id.ok()) return Reply<v1::SecAggResponse>(context, id.status(), response);
  // The certificate the call presented: the one the client's neighbours check its keys against.
  const auto auth = context->auth_context();
  const std::vector<grpc::string_ref> pem =
      auth ? auth->FindPropertyValues("x509_pem_cert") : std::vector<grpc::string_ref>{};
  const std::string certificate = pem.empty() ? "" : std::string(pem[0].data(), pem[0].size());
  return Reply(context, engine_->SecAgg(*id, certificate, *request), response);
}

grpc::ServerUnaryReactor* CoordinatorService::Leave(grpc::CallbackServerContext* context,
                                                    const v1::LeaveRequest* request,
                                                    v1::LeaveResponse* response) {
  auto id = IdentifySession(context);
  if (!id.ok()) return Reply<v1::LeaveResponse>(context, id.status(), response);
  return Reply(context, engine_->Leave(*id, *request), response);
}

absl::StatusOr<std::string> CoordinatorService::Act(const std::string& by,
                                                    const v1::AdminRequest& request) {
  using v1::AdminRequest;
  const std::string& client = request.client();
  if (request.action() == AdminRequest::REMOVE || request.action() == AdminRequest::UNPIN)
    RETURN_IF_ERROR(common::CheckCommonName(client));
  switch (request.action()) {
    case AdminRequest::REMOVE: {
      if (request.reason().size() > 1024 || !common::IsUtf8(request.reason())) {
        return absl::InvalidArgumentError(
            common::StrCat("a reason of ", request.reason().size(), " bytes",
                           common::IsUtf8(request.reason()) ? "" : ", not UTF-8",
                           "; expected up to 1024 bytes of UTF-8"));
      }
      return engine_->Remove(client, by,
                             request.reason().empty() ? "no reason given" : request.reason());
    }
    case AdminRequest::PAUSE:
    case AdminRequest::RESUME:
      return engine_->Pause(request.action() == AdminRequest::PAUSE, by);
    case AdminRequest::EXPORT:
      RETURN_IF_ERROR(engine_->ExportNow());
      return std::string("the latest version is being exported to the state directory's export/");
    case AdminRequest::UNPIN:
      if (pins_ == nullptr)
        return absl::FailedPreconditionError(
            "certificates are not pinned (the coordinator runs without --pin-client-certs)");
      RETURN_IF_ERROR(pins_->Unpin(client));
      return common::StrCat(client, "'s next join pins the certificate it presents");
    default:
      return absl::InvalidArgumentError(
          common::StrCat("unknown action ", static_cast<int>(request.action()),
                         "; expected remove, pause, resume, export or unpin"));
  }
}

grpc::ServerUnaryReactor* CoordinatorService::Admin(grpc::CallbackServerContext* context,
                                                    const v1::AdminRequest* request,
                                                    v1::AdminResponse* response) {
  auto id = Identify(context, Caller::kAdmin);
  if (!id.ok()) return Reply<v1::AdminResponse>(context, id.status(), response);
  absl::StatusOr<std::string> done = Act(*id, *request);
  if (done.ok())
    spdlog::warn("operator {} ({}): {}", *id, context->peer(), *done);
  else
    spdlog::warn("operator {} ({}): {} refused: {}", *id, context->peer(),
                 v1::AdminRequest::Action_Name(request->action()), done.status().message());
  if (!done.ok()) return Reply<v1::AdminResponse>(context, done.status(), response);
  v1::AdminResponse answer;
  answer.set_done(*done);
  return Reply<v1::AdminResponse>(context, answer, response);
}

}  // namespace fedlora::server
