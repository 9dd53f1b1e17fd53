// The gRPC face of the round engine: a thin adapter, callback API. It names the caller (the common
// name of its verified client certificate; "peer <address>" without mutual TLS), checks the
// allow-list, the operator list and the call's session, and turns absl statuses into gRPC ones.
// Long polls hold no thread: the engine completes them.
#ifndef FEDLORA_SERVER_COORDINATOR_SERVICE_H_
#define FEDLORA_SERVER_COORDINATOR_SERVICE_H_

#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/base/log_limiter.h"
#include "fedlora/v1/coordinator.grpc.pb.h"
#include "server/round/engine.h"

namespace fedlora::server {

class CoordinatorService final : public v1::Coordinator::CallbackService {
 public:
  // `allowed`: the client identities admitted (empty: any the CA signed); `operators`: those that
  // may ask for the status, and may not train (empty: any admitted client may ask).
  CoordinatorService(RoundEngine* engine, bool mutual_tls, std::set<std::string> allowed,
                     std::set<std::string> operators = {})
      : engine_(engine),
        mutual_tls_(mutual_tls),
        allowed_(std::move(allowed)),
        operators_(std::move(operators)) {}

  // Replaces the allow-list and the operator list (SIGHUP): calls from now on are checked against
  // the new ones.
  void SetMembership(std::set<std::string> allowed, std::set<std::string> operators)
      ABSL_LOCKS_EXCLUDED(membership_mu_);

  grpc::ServerUnaryReactor* Join(grpc::CallbackServerContext* context,
                                 const v1::JoinRequest* request,
                                 v1::JoinResponse* response) override;
  grpc::ServerUnaryReactor* GetTask(grpc::CallbackServerContext* context,
                                    const v1::GetTaskRequest* request, v1::Task* response) override;
  grpc::ServerUnaryReactor* Download(grpc::CallbackServerContext* context,
                                     const v1::DownloadRequest* request,
                                     v1::DownloadResponse* response) override;
  grpc::ServerUnaryReactor* Upload(grpc::CallbackServerContext* context,
                                   const v1::UploadRequest* request,
                                   v1::UploadResponse* response) override;
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* context,
                                      const v1::HeartbeatRequest* request,
                                      v1::HeartbeatResponse* response) override;
  grpc::ServerUnaryReactor* GetStatus(grpc::CallbackServerContext* context,
                                      const v1::StatusRequest* request,
                                      v1::StatusResponse* response) override;
  grpc::ServerUnaryReactor* Leave(grpc::CallbackServerContext* context,
                                  const v1::LeaveRequest* request,
                                  v1::LeaveResponse* response) override;

 private:
  // The caller's identity, or a PERMISSION_DENIED / UNAUTHENTICATED status: a client must be
  // admitted and not an operator; an operator must be on the operator list, when there is one.
  enum class Caller { kClient, kOperator };
  absl::StatusOr<std::string> Identify(grpc::CallbackServerContext* context,
                                       Caller caller = Caller::kClient) const
      ABSL_LOCKS_EXCLUDED(membership_mu_);
  // Identify, and the call's session must be the identity's latest (RoundEngine::CheckSession).
  absl::StatusOr<std::string> IdentifySession(grpc::CallbackServerContext* context) const;

  RoundEngine* engine_;
  const bool mutual_tls_;
  mutable absl::Mutex membership_mu_;
  std::set<std::string> allowed_ ABSL_GUARDED_BY(membership_mu_);
  std::set<std::string> operators_ ABSL_GUARDED_BY(membership_mu_);
  // Refusals are logged once per 10 s per identity and kind, with a count.
  void Warn(const std::string& key, const std::string& message) const ABSL_LOCKS_EXCLUDED(log_mu_);
  mutable absl::Mutex log_mu_;
  mutable common::LogLimiter log_limiter_ ABSL_GUARDED_BY(log_mu_);
};

grpc::Status ToGrpc(const absl::Status& status);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_COORDINATOR_SERVICE_H_
