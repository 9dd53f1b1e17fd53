// fedlora-server: the coordinator daemon. Options come from a TOML file (--config; keys are the
// long flag names) and flags, which win. It runs the configured rounds, survives restarts on the
// same --state-dir, exports the result to <state-dir>/export (the latest version at any time on
// SIGUSR1), and exits after serving the final state (--linger-s).
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>
#include <toml++/toml.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <set>
#include <thread>

#include "absl/synchronization/mutex.h"
#include "common/base/file_util.h"
#include "common/base/signals.h"
#include "common/base/strings.h"
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

// The command line's options, the config file's under them (--config; keys are the long flag
// names; flags win).
void Configure(CLI::App& app, ServerOptions& o, MainOptions& m) {
  app.set_config("--config", "", "TOML file of options (keys are the long flag names without --)");
  AddOptions(app, o, m);
}

// "+a +b -c", or "unchanged".
std::string Diff(const std::vector<std::string>& before, const std::vector<std::string>& after) {
  const std::set<std::string> old(before.begin(), before.end()), now(after.begin(), after.end());
  std::vector<std::string> changes;
  for (const std::string& id : now)
    if (!old.contains(id)) changes.push_back("+" + id);
  for (const std::string& id : old)
    if (!now.contains(id)) changes.push_back("-" + id);
  return changes.empty() ? "unchanged" : fedlora::common::StrJoin(changes, " ");
}

// Who may call, by `o`: its lists, and its CRL read and checked against `client_ca_pem` (what the
// coordinator's TLS read at start from o.client_ca; what to fix when it cannot be).
absl::StatusOr<fedlora::server::Membership> MembershipOf(const ServerOptions& o,
                                                         const std::string& client_ca_pem) {
  fedlora::server::Membership m{{o.allowed_clients.begin(), o.allowed_clients.end()},
                                {o.operators.begin(), o.operators.end()},
                                nullptr};
  if (o.crl.empty()) return m;
  std::vector<std::string> warnings;
  auto crl = fedlora::common::RevocationList::Load(o.crl, client_ca_pem, o.client_ca, &warnings);
  if (!crl.ok()) return crl.status();
  for (const std::string& w : warnings) spdlog::warn("{}", w);
  m.crl = *std::move(crl);
  return m;
}

std::string DescribeCrl(const fedlora::server::Membership& m) {
  if (m.crl == nullptr) return "";
  return fedlora::common::StrCat("; CRL ", m.crl->file(), ": ", m.crl->size(),
                                 " certificates revoked");
}

// SIGHUP: the command line and config file are read again. The allow-list and the operator list
// take effect at once, and an identity taken off the allow-list leaves the run now; a file that
// does not parse or validate keeps every old setting, and says why.
void Reload(int argc, char** argv, ServerOptions& current, const std::string& client_ca_pem,
            fedlora::server::CoordinatorService& service, fedlora::server::RoundEngine& engine) {
  ServerOptions next;
  MainOptions m;
  CLI::App app;
  Configure(app, next, m);
  try {
    app.parse(argc, argv);
    // CLI11 reads TOML leniently (an unclosed array passes): the file is checked by a TOML parser
    // first, so that a half-edited file changes nothing.
    if (const std::string config = app["--config"]->as<std::string>(); !config.empty())
      (void)toml::parse_file(config);
  } catch (const CLI::Error& e) {
    spdlog::error("SIGHUP: keeping the old settings: {}", e.what());
    return;
  } catch (const toml::parse_error& e) {
    spdlog::error("SIGHUP: keeping the old settings: {}:{}:{}: {}", *e.source().path,
                  e.source().begin.line, e.source().begin.column, e.description());
    return;
  }
  if (absl::Status st = next.Validate(); !st.ok()) {
    spdlog::error("SIGHUP: keeping the old settings: {}", st.message());
    return;
  }
  if (next.client_ca.empty() != current.client_ca.empty()) {
    spdlog::error(
        "SIGHUP: keeping the old settings: client_ca cannot be turned on or off while "
        "the coordinator runs; restart it");
    return;
  }
  if (next.client_ca != current.client_ca)
    spdlog::warn(
        "SIGHUP: client_ca changed to {}; it takes effect when the coordinator restarts "
        "(CRLs are checked against the CA it started with)",
        next.client_ca);
  auto membership = MembershipOf(next, client_ca_pem);
  if (!membership.ok()) {
    spdlog::error("SIGHUP: keeping the old settings: {}", membership.status().message());
    return;
  }
  spdlog::info("SIGHUP: allowed_clients {}; operators {}{}",
               Diff(current.allowed_clients, next.allowed_clients),
               Diff(current.operators, next.operators), DescribeCrl(*membership));
  const nlohmann::json before = current.Settings(), after = next.Settings();
  for (const auto& [key, value] : after.items()) {
    if (!before.contains(key) || before[key] != value)
      spdlog::warn("SIGHUP: {} changed to {}; it takes effect when the coordinator restarts", key,
                   value.dump());
  }
  const std::set<std::string> allowed = membership->allowed, operators = membership->operators;
  for (const auto& [id, why] : service.SetMembership(*std::move(membership)))
    engine.Evict(id, why + " (SIGHUP)");
  const fedlora::v1::StatusResponse status = engine.GetStatus();
  for (const fedlora::v1::ClientStatus& c : status.clients()) {
    if (!allowed.empty() && !allowed.contains(c.id()))
      engine.Evict(c.id(), "taken off the allow-list by the operator (SIGHUP)");
    else if (operators.contains(c.id()))
      engine.Evict(c.id(), "made an operator by the operator (SIGHUP): it may not train");
  }
  current.allowed_clients = next.allowed_clients;
  current.operators = next.operators;
  current.crl = next.crl;
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
  Configure(app, options, m);
  CLI11_PARSE(app, argc, argv);
  // Debian builds Abseil without NDEBUG, which leaves the debug-build deadlock detection on in
  // every absl::Mutex gRPC locks: a graph of all mutexes, one per connection and call, consulted at
  // each lock (5% of the coordinator's CPU with 10,000 clients, growing with them).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  spdlog::set_default_logger(spdlog::stderr_color_mt("server"));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [server] %v");

  fedlora::common::StopOnSignals signals;
  fedlora::common::FlagOnSignal export_request(SIGUSR1);
  fedlora::common::FlagOnSignal reload_request(SIGHUP);

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
  std::string client_ca_pem;  // as the TLS read it: CRLs are checked against it, also after SIGHUP
  if (!options.client_ca.empty()) {
    auto pem = fedlora::common::ReadFileToString(options.client_ca);
    if (!pem.ok()) {
      std::fprintf(stderr, "error: cannot read client_ca %s: %s\n", options.client_ca.c_str(),
                   std::string(pem.status().message()).c_str());
      return 2;
    }
    client_ca_pem = *std::move(pem);
  }
  auto membership = MembershipOf(options, client_ca_pem);
  if (!membership.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(membership.status().message()).c_str());
    return 2;
  }
  if (membership->crl)
    spdlog::info("client certificates checked at every call{}", DescribeCrl(*membership));
  std::unique_ptr<fedlora::server::CertPins> pins;
  if (options.pin_client_certs) {
    auto opened =
        fedlora::server::CertPins::Open(options.state_dir, fedlora::common::Env::Default());
    if (!opened.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(opened.status().message()).c_str());
      return 2;
    }
    pins = *std::move(opened);
  }
  fedlora::server::CoordinatorService service(engine->get(), !options.client_ca.empty(),
                                              *std::move(membership), std::move(pins));
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
    auto listener = fedlora::server::MetricsListener::Start(
        options, (*engine)->view(),
        [&service](std::string_view pem) { return service.IsOperator(pem); });
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
    if (reload_request.Take()) Reload(argc, argv, options, client_ca_pem, service, **engine);
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
