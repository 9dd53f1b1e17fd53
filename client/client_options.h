// fedlora-client's options and its main. Every flag is also a key of the TOML file given with
// --config (flags win); Validate() says what is wrong with a combination before anything starts.
#ifndef FEDLORA_CLIENT_CLIENT_OPTIONS_H_
#define FEDLORA_CLIENT_CLIENT_OPTIONS_H_

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "client/node.h"
#include "client/privacy_ledger.h"
#include "client/workloads/command_workload.h"
#include "client/workloads/llm_workload.h"
#include "client/workloads/regression_workload.h"

namespace fedlora::client {

enum class WorkloadKind { kRegression, kCommand, kLlm };

struct ClientOptions {
  // The coordinator and the channel.
  std::string coordinator = "localhost:50051";  // address:port of fedlora-server
  std::string ca;               // PEM CA of the coordinator's certificate (TLS; required)
  std::string cert, key;        // PEM client certificate and key: mutual TLS, our identity
  std::string tls_server_name;  // the name expected in the coordinator's certificate, if not host
  bool insecure = false;        // plaintext (only against a coordinator started with --insecure)
  // What to train, and each workload's settings.
  WorkloadKind workload = WorkloadKind::kRegression;
  RegressionOptions regression;
  LlmOptions llm;
  CommandOptions command;
  std::string modules;    // command: adaptable layers as name:in_features:out_features,...
  DpSgdSettings privacy;  // DP-SGD (regression, llm); off unless a noise multiplier is given
  NodeOptions node;       // retries, chunks, the final state's directory
  // Instead of taking part: print the coordinator's view of the run and exit.
  bool status = false, status_json = false;
  // Instead of taking part: an operator's action on the run (remove, pause, resume, export, unpin),
  // on `admin_client` (remove, unpin) for `admin_reason` (remove).
  std::string admin, admin_client, admin_reason;
  // Takes part in the run (no --status or --admin).
  bool trains() const { return !status && !status_json && admin.empty(); }

  absl::Status Validate() const;
};

// fedlora-client exits 0 when the run is done (or the status is printed), 1 when it fails, 2 on
// bad options or files, and kExitRefused when its identity is refused, which no retry changes: its
// certificate is expired or not yet valid, the coordinator does not trust it (unknown CA) or admit
// it (not on the allow-list; an operator's), or a later process joined with the same identity.
inline constexpr int kExitRefused = 3;

// Declares every flag of fedlora-client on `app`, bound to `o`.
void AddClientFlags(CLI::App& app, ClientOptions& o);

// fedlora-client's main. `extend` may declare more flags before parsing (the fault tests' client
// build adds its instrumentation there).
int ClientMain(int argc, char** argv,
               const std::function<void(CLI::App&, ClientOptions&)>& extend = {});

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_CLIENT_OPTIONS_H_
