#include "server/coordinator_service.h"

#include <spdlog/spdlog.h>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
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
                                                         Caller caller) const {
  if (!mutual_tls_) {
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
  absl::MutexLock lock(&membership_mu_);
  if (caller == Caller::kOperator && !operators_.empty()) {
    if (operators_.contains(id)) return id;
    Warn("status " + id, common::StrCat("refused ", id, " (", context->peer(),
                                        ") the status: not on the operator list"));
    return absl::PermissionDeniedError(
        common::StrCat("identity '", id,
                       "' may not ask for the run's status: it is not an operator (--operators)"));
  }
  if (caller == Caller::kClient && operators_.contains(id)) {
    Warn("operator " + id, common::StrCat("refused ", id, " (", context->peer(),
                                          "): an operator identity cannot take part"));
    return absl::PermissionDeniedError(common::StrCat(
        "identity '", id, "' is an operator (--operators): it may ask for the status, not train"));
  }
  if (!allowed_.empty() && !allowed_.count(id)) {
    Warn("allow " + id,
         common::StrCat("refused ", id, " (", context->peer(), "): not on the allow-list"));
    return absl::PermissionDeniedError(
        common::StrCat("client identity '", id, "' is not on the allow-list"));
  }
  return id;
}

void CoordinatorService::SetMembership(std::set<std::string> allowed,
                                       std::set<std::string> operators) {
  absl::MutexLock lock(&membership_mu_);
  allowed_ = std::move(allowed);
  operators_ = std::move(operators);
}

void CoordinatorService::Warn(const std::string& key, const std::string& message) const {
  absl::MutexLock lock(&log_mu_);
  if (std::string repeated; log_limiter_.Allow(key, common::LogLimiter::Clock::now(), &repeated))
    spdlog::warn("{}{}", message, repeated);
}

absl::StatusOr<std::string> CoordinatorService::IdentifySession(
    grpc::CallbackServerContext* context) const {
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
  auto id = Identify(context);
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
  auto id = Identify(context, Caller::kOperator);
  if (!id.ok()) return Reply<v1::StatusResponse>(context, id.status(), response);
  return Reply<v1::StatusResponse>(context, engine_->GetStatus(), response);
}

grpc::ServerUnaryReactor* CoordinatorService::Leave(grpc::CallbackServerContext* context,
                                                    const v1::LeaveRequest* request,
                                                    v1::LeaveResponse* response) {
  auto id = IdentifySession(context);
  if (!id.ok()) return Reply<v1::LeaveResponse>(context, id.status(), response);
  return Reply(context, engine_->Leave(*id, *request), response);
}

}  // namespace fedlora::server
