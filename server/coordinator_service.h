// The gRPC face of the round engine: a thin adapter, callback API. It names the caller (the common
// name of its verified client certificate; "peer <address>" without mutual TLS), checks the
// allow-list, the operator list and the call's session, and turns absl statuses into gRPC ones.
// Long polls hold no thread: the engine completes them.
#ifndef FEDLORA_SERVER_COORDINATOR_SERVICE_H_
#define FEDLORA_SERVER_COORDINATOR_SERVICE_H_

#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/base/log_limiter.h"
#include "common/net/revocation.h"
#include "fedlora/v1/coordinator.grpc.pb.h"
#include "server/cert_pins.h"
#include "server/round/engine.h"

namespace fedlora::server {

// Who may call, with mutual TLS.
struct Membership {
  std::set<std::string> allowed;  // the client identities admitted (empty: any the CA signed)
  // Those that may ask for the status and act on the run (Admin), and may not train. Empty: any
  // admitted client may ask for the status, and no one may act.
  std::set<std::string> operators;
  std::shared_ptr<const common::RevocationList> crl;  // certificates refused (null: none)
};

class CoordinatorService final : public v1::Coordinator::CallbackService {
 public:
  // `pins`: with --pin-client-certs, the certificate each identity is pinned to (null: off).
  CoordinatorService(RoundEngine* engine, bool mutual_tls, Membership membership,
                     std::unique_ptr<CertPins> pins = nullptr)
      : engine_(engine),
        mutual_tls_(mutual_tls),
        pins_(std::move(pins)),
        membership_(std::move(membership)) {}

  // Replaces who may call (SIGHUP): calls from now on are checked against it. Returns the joined
  // identities whose certificate (the one they last joined with) the new CRL revokes, so that the
  // caller ends their sessions (RoundEngine::Evict).
  std::map<std::string, std::string> SetMembership(Membership membership)
      ABSL_LOCKS_EXCLUDED(membership_mu_);

  // Whether the client certificate `pem` is an operator's now: its name on the operator list, not
  // revoked, and (with pins) the one its name is pinned to, or pinned now. For the metrics
  // listener.
  bool IsOperator(std::string_view pem) ABSL_LOCKS_EXCLUDED(membership_mu_);

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
  grpc::ServerUnaryReactor* SecAgg(grpc::CallbackServerContext* context,
                                   const v1::SecAggRequest* request,
                                   v1::SecAggResponse* response) override;
  grpc::ServerUnaryReactor* Leave(grpc::CallbackServerContext* context,
                                  const v1::LeaveRequest* request,
                                  v1::LeaveResponse* response) override;
  grpc::ServerUnaryReactor* Admin(grpc::CallbackServerContext* context,
                                  const v1::AdminRequest* request,
                                  v1::AdminResponse* response) override;

 private:
  // The caller's identity, or a PERMISSION_DENIED / UNAUTHENTICATED status: its certificate must
  // not be revoked; a client must be admitted (allow-list) and not an operator; the status may be
  // asked by an operator, or by an admitted client when there are no operators; Admin only by an
  // operator. With pins, a client presents the certificate its first join pinned, an operator the
  // one of its first call.
  enum class Caller { kClient, kJoin, kStatus, kAdmin };
  absl::StatusOr<std::string> Identify(grpc::CallbackServerContext* context,
                                       Caller caller = Caller::kClient)
      ABSL_LOCKS_EXCLUDED(membership_mu_);
  absl::StatusOr<std::string> Act(const std::string& by, const v1::AdminRequest& request);
  // Identify, and the call's session must be the identity's latest (RoundEngine::CheckSession).
  absl::StatusOr<std::string> IdentifySession(grpc::CallbackServerContext* context);

  RoundEngine* engine_;
  const bool mutual_tls_;
  const std::unique_ptr<CertPins> pins_;
  mutable absl::Mutex membership_mu_;
  Membership membership_ ABSL_GUARDED_BY(membership_mu_);
  // The certificate each identity last joined with.
  std::map<std::string, common::CertificateId> joined_with_ ABSL_GUARDED_BY(membership_mu_);
  // Refusals are logged once per 10 s per identity and kind, with a count.
  void Warn(const std::string& key, const std::string& message) const ABSL_LOCKS_EXCLUDED(log_mu_);
  mutable absl::Mutex log_mu_;
  mutable common::LogLimiter log_limiter_ ABSL_GUARDED_BY(log_mu_);
};

grpc::Status ToGrpc(const absl::Status& status);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_COORDINATOR_SERVICE_H_
