// The coordinator's HTTP listener for people and machines (--metrics-listen): the Prometheus
// metrics at /metrics, the live page at / (with /page.js, /page.css and its data at /api/run),
// served by cpp-httplib on threads of its own from a RunView — never under the engine's lock.
//
// On a loopback address it serves plain HTTP to anyone on the machine. On any other address it
// serves HTTPS only (the coordinator's certificate) and only to an operator: a client certificate
// of --client-ca whose common name is in --operators, or a request carrying the bearer token of
// --metrics-token-file. Anything else is refused at start, with what to add.
#ifndef FEDLORA_SERVER_OBSERVE_LISTENER_H_
#define FEDLORA_SERVER_OBSERVE_LISTENER_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "server/observe/run_view.h"
#include "server/server_options.h"

namespace httplib {
class Server;
}

namespace fedlora::server {

class MetricsListener {
 public:
  // Whether the verified client certificate `pem` is an operator's now (the coordinator's current
  // operator list and CRL: CoordinatorService::IsOperator).
  using IsOperator = std::function<bool(std::string_view pem)>;
  // Listens on options.metrics_listen (port 0: one the system picks) and serves `view`.
  // `is_operator` null: a common name in options.operators.
  static absl::StatusOr<std::unique_ptr<MetricsListener>> Start(const ServerOptions& options,
                                                                std::shared_ptr<const RunView> view,
                                                                IsOperator is_operator = nullptr);
  ~MetricsListener();  // stops listening; requests in flight finish first

  int port() const { return port_; }

 private:
  MetricsListener() = default;

  std::shared_ptr<const RunView> view_;
  std::unique_ptr<httplib::Server> http_;
  int port_ = 0;
  std::atomic<bool> stopped_ = false;  // the thread has stopped listening
  std::thread thread_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_OBSERVE_LISTENER_H_
