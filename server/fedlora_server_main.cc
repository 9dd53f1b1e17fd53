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

#include "common/base/file_util.h"
#include "common/base/signals.h"
#include "common/net/tls.h"
#include "server/coordinator_service.h"
#include "server/ticker.h"

namespace {

using fedlora::server::ServerOptions;

void AddOptions(CLI::App& app, ServerOptions& o, double& linger_s, std::string& port_file) {
  std::map<std::string, fedlora::common::Method> methods;
  for (fedlora::common::Method m : fedlora::common::kAllMethods)
    methods.emplace(fedlora::common::MethodName(m), m);
  app.add_option("--method", o.method, "fedit | flora | lora-fair | fed-sb")
      ->transform(CLI::CheckedTransformer(methods))
      ->default_str("fedit");
  app.add_option("--rounds", o.rounds)->capture_default_str();
  app.add_option("--seed", o.seed, "seed of cohorts, initial factors and task seeds")
      ->capture_default_str();
  app.add_option("--state-dir", o.state_dir,
                 "ledger, blobs, metrics and exports; a restart continues from it")
      ->capture_default_str();
  app.add_option("--min-clients", o.min_clients, "joined clients needed before round 1")
      ->capture_default_str();
  app.add_option("--fraction", o.fraction, "share of joined clients in each cohort")
      ->capture_default_str();
  app.add_option("--min-cohort", o.min_cohort)->capture_default_str();
  app.add_option("--quorum", o.quorum, "share of the cohort that closes a round at its deadline")
      ->capture_default_str();
  app.add_option("--round-deadline-s", o.round_deadline_s)->capture_default_str();
  app.add_option("--client-timeout-s", o.client_timeout_s,
                 "silence after which a cohort member counts as dropped")
      ->capture_default_str();
  app.add_option("--rank", o.rank)->capture_default_str();
  app.add_option("--lora-alpha", o.lora_alpha)->capture_default_str();
  app.add_option("--local-steps", o.local_steps)->capture_default_str();
  app.add_option("--learning-rate", o.learning_rate)->capture_default_str();
  app.add_option("--target-modules", o.target_modules,
                 "module name suffixes to adapt (default: all offered)")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_option("--max-client-examples", o.max_client_examples,
                 "a client joining with more examples is refused; an update may not claim more "
                 "than its client joined with")
      ->capture_default_str();
  app.add_option("--max-update-norm", o.max_update_norm,
                 "reject an update whose ‖s·B·A‖_F (flat over modules) exceeds this; 0: off")
      ->capture_default_str();
  app.add_option("--base-model-sha256", o.base_model_sha256,
                 "required base model (default: the first client's)");
  app.add_option("--lora-fair-lambda", o.lora_fair_lambda)->capture_default_str();
  app.add_option("--fed-sb-init", o.fed_sb_init,
                 "fed-sb's B, A, R0: sketch (federated randomized SVD of the clients' gradient), "
                 "dense (each client's whole gradient once) or random")
      ->capture_default_str();
  app.add_option("--fed-sb-oversampling", o.fed_sb_oversampling, "sketch columns beyond the rank")
      ->capture_default_str();
  app.add_option("--fed-sb-power-iterations", o.fed_sb_power_iterations)->capture_default_str();
  app.add_option("--fed-sb-init-examples", o.fed_sb_init_examples,
                 "records per client the initialising gradient is taken over")
      ->capture_default_str();
  app.add_option("--fed-sb-init-lr", o.fed_sb_init_lr,
                 "step size of the full update the initialisation approximates")
      ->capture_default_str();
  app.add_option("--base-model-dir", o.base_model_dir,
                 "the base model (Hugging Face directory): pins the run to it, evaluates "
                 "--eval-data each round, exports merged weights");
  app.add_option("--eval-data", o.eval_data, "held-out JSONL evaluated after every round");
  app.add_option("--eval-max-length", o.eval_max_length, "tokens per held-out record")
      ->capture_default_str();
  app.add_option("--dp-clip", o.dp_clip,
                 "client-level DP: bound on each client's update (flat L2 of its change); 0: off")
      ->capture_default_str();
  app.add_option("--dp-noise-multiplier", o.dp_noise_multiplier,
                 "client-level DP: noise stddev / clip of each round")
      ->capture_default_str();
  app.add_option("--dp-init-noise-multiplier", o.dp_init_noise_multiplier,
                 "client-level DP: noise stddev of each step of fed-sb's initialisation (its "
                 "answers scaled to norm 1); default: --dp-noise-multiplier");
  app.add_flag("--dp-adaptive-clip", o.dp_adaptive_clip,
               "client-level DP: the clip follows a quantile of the update norms (Andrew et al.)");
  app.add_option("--dp-target-quantile", o.dp_target_quantile)->capture_default_str();
  app.add_option("--dp-clip-learning-rate", o.dp_clip_learning_rate)->capture_default_str();
  app.add_option("--dp-count-stddev", o.dp_count_stddev,
                 "noise of the unclipped count (adaptive clipping); < 0: cohort / 20")
      ->capture_default_str();
  app.add_option("--dp-delta", o.dp_delta)->capture_default_str();
  app.add_option("--dp-target-epsilon", o.dp_target_epsilon,
                 "client-level DP: end the run before a round would spend more")
      ->capture_default_str();
  app.add_option("--listen", o.listen, "address:port (port 0 picks a free one)")
      ->capture_default_str();
  app.add_option("--tls-cert", o.tls_cert, "PEM certificate chain of the server");
  app.add_option("--tls-key", o.tls_key, "PEM private key of the server");
  app.add_option("--client-ca", o.client_ca, "PEM CA of client certificates: enables mutual TLS");
  app.add_option("--allowed-clients", o.allowed_clients, "client certificate common names admitted")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_flag("--insecure", o.insecure,
               "plaintext without client identities (experiments on one machine only)");
  app.add_option("--chunk-bytes", o.chunk_bytes)->capture_default_str();
  app.add_option("--max-update-bytes", o.max_update_bytes)->capture_default_str();
  app.add_option("--max-wait-ms", o.max_wait_ms, "longest long poll")->capture_default_str();
  app.add_option("--give-up-after-s", o.give_up_after_s,
                 "a round's commit (or its metrics or export) failing this long stops the server")
      ->capture_default_str();
  app.add_option("--linger-s", linger_s,
                 "after the last round, keep serving the final state this long")
      ->capture_default_str();
  app.add_option("--port-file", port_file,
                 "write the port listened on to this file (for --listen ...:0)");
}

}  // namespace

int main(int argc, char** argv) {
  ServerOptions options;
  double linger_s = 10;
  std::string port_file;
  CLI::App app{"fedlora-server: the coordinator of a federated LoRA fine-tuning run"};
  app.set_config("--config", "", "TOML file of options (keys are the long flag names without --)");
  AddOptions(app, options, linger_s, port_file);
  CLI11_PARSE(app, argc, argv);
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
  fedlora::server::Ticker ticker(engine->get());
  fedlora::server::CoordinatorService service(
      engine->get(), !options.client_ca.empty(),
      std::set<std::string>(options.allowed_clients.begin(), options.allowed_clients.end()));
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
  if (!port_file.empty()) {
    if (auto st = fedlora::common::WriteFileAtomically(port_file, std::to_string(port) + "\n");
        !st.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(st.message()).c_str());
      return 1;
    }
  }

  std::optional<std::chrono::steady_clock::time_point> done_at;
  while (!signals.stop()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
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
      if (std::chrono::steady_clock::now() - *done_at >= std::chrono::duration<double>(linger_s))
        signals.RequestStop();
    }
  }
  ticker.Stop();
  (*engine)->Shutdown();
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  if (!(*engine)->failed().ok()) return 4;
  return (*engine)->done() ? 0 : 3;
}
