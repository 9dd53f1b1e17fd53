// The gRPC face of the round engine: a thin adapter, callback API. It names the caller (the common
// name of its verified client certificate; "peer <address>" without mutual TLS), checks the
// allow-list, and turns absl statuses into gRPC ones. Long polls hold no thread: the engine
// completes them.
#ifndef FEDLORA_SERVER_COORDINATOR_SERVICE_H_
#define FEDLORA_SERVER_COORDINATOR_SERVICE_H_

#include <set>
#include <string>

#include "fedlora/v1/coordinator.grpc.pb.h"
#include "server/round_engine.h"

namespace fedlora::server {

class CoordinatorService final : public v1::Coordinator::CallbackService {
 public:
  CoordinatorService(RoundEngine* engine, bool mutual_tls, std::set<std::string> allowed)
      : engine_(engine), mutual_tls_(mutual_tls), allowed_(std::move(allowed)) {}

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
  // The caller's identity, or a PERMISSION_DENIED / UNAUTHENTICATED status.
  absl::StatusOr<std::string> Identify(grpc::CallbackServerContext* context) const;

  RoundEngine* engine_;
  const bool mutual_tls_;
  const std::set<std::string> allowed_;
};

grpc::Status ToGrpc(const absl::Status& status);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_COORDINATOR_SERVICE_H_
