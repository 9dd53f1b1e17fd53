// fedlora-server: the coordinator daemon. Options come from a TOML file (--config; keys are the
// long flag names) and flags, which win. It runs the configured rounds, survives restarts on the
// same --state-dir, exports the result to <state-dir>/export (the latest version at any time on
// SIGUSR1), and exits after serving the final state (--linger-s).
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "common/base/file_util.h"
#include "common/base/signals.h"
#include "common/net/grpc_log.h"
#include "common/net/tls.h"
#include "server/coordinator_service.h"
#include "server/observe/listener.h"
#include "server/ticker.h"

namespace {

using fedlora::server::ServerOptions;

struct MainOptions {
  double linger_s = 10;
  std::string port_file, metrics_port_file;
};

void AddOptions(CLI::App& app, ServerOptions& o, MainOptions& m) {
  fedlora::server::AddServerFlags(app, o);
  app.add_option("--linger-s", m.linger_s,
                 "after the last round, keep serving the final state this long")
      ->capture_default_str();
  app.add_option("--port-file", m.port_file,
                 "write the port listened on to this file (for --listen ...:0)");
  app.add_option("--metrics-port-file", m.metrics_port_file,
                 "write the port of --metrics-listen to this file (for ...:0)");
}

bool WritePort(const std::string& file, int port) {
  if (file.empty()) return true;
  absl::Status st = fedlora::common::WriteFileAtomically(file, std::to_string(port) + "\n");
  if (!st.ok()) std::fprintf(stderr, "error: %s\n", std::string(st.message()).c_str());
  return st.ok();
}

}  // namespace

int main(int argc, char** argv) {
  fedlora::common::KeepOpenSslUntilExit();
  ServerOptions options;
  MainOptions m;
  CLI::App app{"fedlora-server: the coordinator of a federated LoRA fine-tuning run"};
  app.set_config("--config", "", "TOML file of options (keys are the long flag names without --)");
  AddOptions(app, options, m);
  CLI11_PARSE(app, argc, argv);
  // Debian builds Abseil without NDEBUG, which leaves the debug-build deadlock detection on in
  // every absl::Mutex gRPC locks: a graph of all mutexes, one per connection and call, consulted at
  // each lock (5% of the coordinator's CPU with 10,000 clients, growing with them).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  spdlog::set_default_logger(spdlog::stderr_color_mt("server"));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [server] %v");

  fedlora::common::StopOnSignals signals;
  fedlora::common::FlagOnSignal export_request(SIGUSR1);

  if (absl::Status st = options.Validate(); !st.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  if (options.insecure) {
    spdlog::warn(
        "--insecure: plaintext gRPC without client identities; anyone who can reach {} can join, "
        "read and "
        "submit. Use TLS with --client-ca outside experiments on one machine.",
        options.listen);
  }
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::InsecureServerCredentials();
  if (!options.insecure) {
    auto tls =
        fedlora::common::ServerTlsCredentials(options.tls_cert, options.tls_key, options.client_ca);
    if (!tls.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(tls.status().message()).c_str());
      return 2;
    }
    credentials = *tls;
  }
  auto engine = fedlora::server::RoundEngine::Create(options);
  if (!engine.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(engine.status().message()).c_str());
    return 1;
  }
  fedlora::common::RouteGrpcLog([view = (*engine)->view()] { view->CountHandshakeFailure(); });
  fedlora::server::Ticker ticker(engine->get());
  fedlora::server::CoordinatorService service(
      engine->get(), !options.client_ca.empty(),
      std::set<std::string>(options.allowed_clients.begin(), options.allowed_clients.end()),
      std::set<std::string>(options.operators.begin(), options.operators.end()));
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(options.listen, credentials, &port);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  for (const auto& [key, value] : fedlora::common::TransportChannelArgs(options.chunk_bytes))
    builder.AddChannelArgument(key, value);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server || port == 0) {
    std::fprintf(stderr, "error: cannot listen on %s (address in use, or not an address:port)\n",
                 options.listen.c_str());
    return 1;
  }
  spdlog::info("listening on {} (port {}), {}", options.listen, port,
               options.insecure            ? "PLAINTEXT"
               : options.client_ca.empty() ? "TLS"
                                           : "mutual TLS");
  if (!WritePort(m.port_file, port)) return 1;
  std::unique_ptr<fedlora::server::MetricsListener> metrics;
  if (!options.metrics_listen.empty()) {
    (*engine)->PublishStatus();
    auto listener = fedlora::server::MetricsListener::Start(options, (*engine)->view());
    if (!listener.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(listener.status().message()).c_str());
      return 1;
    }
    metrics = *std::move(listener);
    if (!WritePort(m.metrics_port_file, metrics->port())) return 1;
  }

  std::optional<std::chrono::steady_clock::time_point> done_at;
  for (int tick = 1; !signals.stop(); ++tick) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    if (metrics && tick % 10 == 0) (*engine)->PublishStatus();  // what /metrics and the page show
    if (export_request.Take()) {
      spdlog::info("SIGUSR1: exporting the latest version");
      if (absl::Status st = (*engine)->ExportNow(); !st.ok())
        spdlog::warn("export on request: {}", std::string(st.message()));
    }
    if (absl::Status failed = (*engine)->failed(); !failed.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(failed.message()).c_str());
      signals.RequestStop();
      break;
    }
    if ((*engine)->done()) {
      if (!done_at) done_at = std::chrono::steady_clock::now();
      if (std::chrono::steady_clock::now() - *done_at >= std::chrono::duration<double>(m.linger_s))
        signals.RequestStop();
    }
  }
  ticker.Stop();
  (*engine)->Shutdown();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (!(*engine)->failed().ok()) return 4;
  return (*engine)->done() ? 0 : 3;
}
