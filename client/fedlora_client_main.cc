// fedlora-client: a site's node. Joins the coordinator over TLS (mutual TLS with --cert/--key),
// trains when selected, uploads its update, and catches up on whatever it missed. Exits 0 when the
// run is done; SIGTERM stops it cleanly.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <cstdio>
#include <thread>

#include "client/workloads/command_workload.h"
#include "client/workloads/llm_workload.h"
#include "client/node.h"
#include "client/workloads/regression_workload.h"
#include "common/base/signals.h"
#include "common/net/tls.h"
#include "fedlora/v1/coordinator.grpc.pb.h"

namespace {

// --status: the run as the coordinator sees it, for operators (any identity it accepts may ask).
int PrintStatus(const std::shared_ptr<grpc::Channel>& channel, const std::string& insecure_id,
                bool json) {
  grpc::ClientContext context;
  if (!insecure_id.empty()) context.AddMetadata(fedlora::common::kClientIdMetadata, insecure_id);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  fedlora::v1::StatusResponse s;
  if (grpc::Status st = fedlora::v1::Coordinator::NewStub(channel)->GetStatus(
          &context, fedlora::v1::StatusRequest(), &s);
      !st.ok()) {
    std::fprintf(stderr, "error: the coordinator's status: %s\n", st.error_message().c_str());
    return 1;
  }
  if (json) {
    std::string out;
    google::protobuf::util::JsonPrintOptions options;
    options.add_whitespace = true;
    options.always_print_primitive_fields = true;
    options.preserve_proto_field_names = true;
    if (!google::protobuf::util::MessageToJsonString(s, &out, options).ok()) return 1;
    std::fputs(out.c_str(), stdout);
    return 0;
  }
  auto join = [](const auto& ids) {
    std::string out;
    for (const std::string& id : ids) out += (out.empty() ? "" : ", ") + id;
    return out.empty() ? std::string("-") : out;
  };
  std::printf("run %s (%s): %s, round %lld of %lld, state version %lld\n", s.run_id().c_str(),
              s.method().c_str(), s.phase().c_str(), static_cast<long long>(s.round()),
              static_cast<long long>(s.rounds()), static_cast<long long>(s.state_version()));
  std::printf("cohort: %s\narrived: %s\n", join(s.cohort()).c_str(), join(s.arrived()).c_str());
  std::printf("%-24s %10s %8s %14s\n", "client", "examples", "rounds", "last seen");
  const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
  for (const auto& c : s.clients()) {
    std::printf("%-24s %10lld %8lld %12.1fs ago\n", c.id().c_str(),
                static_cast<long long>(c.num_examples()),
                static_cast<long long>(c.rounds_contributed()),
                static_cast<double>(now_ms - c.last_seen_unix_ms()) / 1000.0);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string coordinator = "localhost:50051", ca, cert, key, server_name, workload = "regression";
  bool insecure = false;
  fedlora::client::NodeOptions node;
  fedlora::client::RegressionOptions regression;
  CLI::App app{"fedlora-client: a client node of a federated LoRA fine-tuning run"};
  app.set_config("--config", "", "TOML file of options (keys are the long flag names without --)");
  app.add_option("--coordinator", coordinator, "address:port of fedlora-server")
      ->capture_default_str();
  app.add_option("--ca", ca, "PEM CA that signed the coordinator's certificate");
  app.add_option("--cert", cert,
                 "PEM client certificate (mutual TLS; its common name is this client's identity)");
  app.add_option("--key", key, "PEM private key of --cert");
  app.add_option("--tls-server-name", server_name,
                 "expected name in the coordinator's certificate, if not the host");
  app.add_flag("--insecure", insecure,
               "plaintext (only against a coordinator started with --insecure)");
  app.add_option(
      "--id", node.id,
      "client name, sent in the clear; only with --insecure (TLS names us by certificate)");
  app.add_option("--workload", workload, "what to train: regression | command | llm")
      ->capture_default_str()
      ->check(CLI::IsMember({"regression", "command", "llm"}));
  fedlora::client::LlmOptions llm;
  app.add_option("--model", llm.model_dir, "llm: the site's Hugging Face model directory");
  app.add_option("--data", llm.data, "llm: the site's training JSONL");
  app.add_option("--max-length", llm.max_length, "llm: tokens per record")->capture_default_str();
  app.add_option("--batch", llm.batch, "llm: records per micro-batch")->capture_default_str();
  app.add_option("--grad-accum", llm.grad_accum, "llm: micro-batches per optimiser step")
      ->capture_default_str();
  app.add_option("--eval-examples", llm.eval_examples,
                 "llm: records whose loss is reported before and after each round")
      ->capture_default_str();
  app.add_option("--threads", llm.threads, "llm: threads (0: all cores)")->capture_default_str();
  fedlora::client::DpSgdSettings privacy;
  app.add_option("--dp-noise-multiplier", privacy.dp.noise_multiplier,
                 "regression, llm: DP-SGD noise stddev / clip (per-example clipping, Poisson "
                 "sampling); off when not given");
  app.add_option("--dp-clip", privacy.dp.clip, "DP-SGD per-example clip norm")
      ->capture_default_str();
  app.add_option("--dp-sample-rate", privacy.dp.sample_rate,
                 "DP-SGD sampling rate (llm default: batch / records; regression default: 0.1)");
  app.add_option("--dp-delta", privacy.delta, "delta of the epsilon reported")
      ->capture_default_str();
  app.add_option("--target-epsilon", privacy.target_epsilon,
                 "DP-SGD: decline rounds (and leave the run) once the next one would pass this");
  app.add_option("--privacy-ledger", privacy.ledger, "where DP-SGD's spending is kept")
      ->capture_default_str();
  fedlora::client::CommandOptions command;
  std::string module_list;
  app.add_option(
      "--train-command", command.command,
      "command: the site's training program (see client/command_workload.h for its contract)");
  app.add_option("--base-model-sha256", command.base_model_sha256,
                 "command: fingerprint of the site's base model");
  app.add_option("--modules", module_list,
                 "command: adaptable layers, name:in_features:out_features,...");
  app.add_option("--work-dir", command.work_dir,
                 "command: where tasks and the program's outputs go")
      ->capture_default_str();
  app.add_option("--base-seed", regression.base_seed,
                 "regression: the base model (same for all clients)")
      ->capture_default_str();
  app.add_option("--data-seed", regression.data_seed, "regression: this client's data")
      ->capture_default_str();
  app.add_option("--layers", regression.layers)->capture_default_str();
  app.add_option("--in-features", regression.in_features)->capture_default_str();
  app.add_option("--out-features", regression.out_features)->capture_default_str();
  app.add_option("--examples", regression.examples)->capture_default_str();
  app.add_option("--heterogeneity", regression.heterogeneity,
                 "regression: size of the client-specific target")
      ->capture_default_str();
  app.add_option("--out-dir", node.out_dir, "write the final state here when the run is done");
  app.add_option("--chunk-bytes", node.chunk_bytes)->capture_default_str();
  app.add_option("--max-retry-s", node.max_retry_s, "give up on a call after retrying this long")
      ->capture_default_str();
  app.add_option("--testing-exit-after-uploads", node.exit_after_uploads,
                 "testing: die after N uploads");
  app.add_option("--testing-die-mid-upload", node.die_mid_upload_fraction,
                 "testing: die after sending this fraction of the first upload");
  bool show_status = false, status_json = false;
  app.add_flag("--status", show_status,
               "print the coordinator's view of the run (round, phase, cohort, clients) and exit");
  app.add_flag("--status-json", status_json, "the same as JSON");
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("client"));
  spdlog::set_pattern(
      fmt::format("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [{}] %v", node.id.empty() ? "client" : node.id));
  const char* dp_error =
      privacy.target_epsilon > 0 && !privacy.enabled()
          ? "--target-epsilon needs DP-SGD (--dp-noise-multiplier)"
      : privacy.enabled() && !(privacy.dp.clip > 0) ? "--dp-clip must be > 0"
      : privacy.enabled() && workload == "command"
          ? "DP-SGD runs in the built-in trainers (--workload llm or regression); a command "
            "workload's program must do its own"
          : nullptr;
  if (dp_error) {
    std::fprintf(stderr, "error: %s\n", dp_error);
    return 2;
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (insecure) {
    spdlog::warn("--insecure: plaintext to {}; updates and identity travel unprotected",
                 coordinator);
  } else {
    if (ca.empty()) {
      std::fprintf(
          stderr,
          "error: TLS needs --ca (the CA of the coordinator's certificate), or --insecure\n");
      return 2;
    }
    auto tls = fedlora::common::ClientTlsCredentials(ca, cert, key);
    if (!tls.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(tls.status().message()).c_str());
      return 2;
    }
    credentials = *tls;
  }
  grpc::ChannelArguments args;
  const int max_message = static_cast<int>(node.chunk_bytes + (1 << 20));
  args.SetMaxReceiveMessageSize(max_message);
  args.SetMaxSendMessageSize(max_message);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 30000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  // A refused connection makes the channel re-resolve the coordinator's name, which gRPC allows
  // only every 30 s by default: a client then sat out up to ~20 s of a restarted coordinator.
  args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 500);
  for (const auto& [key, value] : fedlora::common::TransportChannelArgs()) args.SetInt(key, value);
  if (!server_name.empty()) args.SetSslTargetNameOverride(server_name);
  auto channel = grpc::CreateCustomChannel(coordinator, credentials, args);
  if (show_status || status_json) return PrintStatus(channel, insecure ? node.id : "", status_json);

  std::unique_ptr<fedlora::client::Workload> trainer;
  if (workload == "regression") {
    regression.privacy = privacy;
    trainer = std::make_unique<fedlora::client::RegressionWorkload>(regression);
  } else if (workload == "command") {
    auto modules = fedlora::client::ParseModuleList(module_list);
    if (command.command.empty() || command.base_model_sha256.empty() || !modules.ok()) {
      std::fprintf(stderr,
                   "error: the command workload needs --train-command, --base-model-sha256 and "
                   "--modules%s%s\n",
                   modules.ok() ? "" : ": ",
                   modules.ok() ? "" : std::string(modules.status().message()).c_str());
      return 2;
    }
    command.modules = *modules;
    command.examples = regression.examples;
    trainer = std::make_unique<fedlora::client::CommandWorkload>(command);
  } else {
    if (llm.model_dir.empty() || llm.data.empty()) {
      std::fprintf(stderr, "error: the llm workload needs --model DIR and --data FILE\n");
      return 2;
    }
    llm.privacy = privacy;
    auto created = fedlora::client::LlmWorkload::Create(llm);
    if (!created.ok()) {
      std::fprintf(stderr, "error: %s\n", std::string(created.status().message()).c_str());
      return 2;
    }
    trainer = std::move(*created);
  }
  fedlora::common::StopOnSignals signals;

  fedlora::client::Node client(channel, node, std::move(trainer));
  absl::Status status = client.Run(signals.stop());
  if (!status.ok() && !absl::IsCancelled(status)) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return 1;
  }
  return 0;
}
