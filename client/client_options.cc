#include "client/client_options.h"

#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdio>
#include <map>

#include "common/base/signals.h"
#include "common/base/strings.h"
#include "common/net/tls.h"
#include "common/net/wire.h"
#include "fedlora/v1/coordinator.grpc.pb.h"

namespace fedlora::client {
namespace {

using common::StrCat;

// What fedlora-client exits with after `failure`: kExitRefused when its identity is refused.
int ExitCodeFor(const absl::Status& failure) {
  return absl::IsPermissionDenied(failure) || absl::IsUnauthenticated(failure) ? kExitRefused : 1;
}

// --status: the run as the coordinator sees it, for operators (any identity it accepts may ask).
int PrintStatus(const std::shared_ptr<grpc::Channel>& channel, const std::string& insecure_id,
                bool json, const std::function<absl::Status(const grpc::Status&)>& diagnose) {
  grpc::ClientContext context;
  if (!insecure_id.empty()) context.AddMetadata(common::kClientIdMetadata, insecure_id);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::StatusResponse s;
  if (grpc::Status st =
          v1::Coordinator::NewStub(channel)->GetStatus(&context, v1::StatusRequest(), &s);
      !st.ok()) {
    absl::Status failure = diagnose ? diagnose(st) : absl::OkStatus();
    if (!absl::IsPermissionDenied(failure))
      failure = absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
    std::fprintf(stderr, "error: the coordinator's status: %s\n",
                 std::string(failure.message()).c_str());
    return ExitCodeFor(failure);
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
              common::MethodNameOf(s.method()).c_str(), s.phase().c_str(),
              static_cast<long long>(s.round()), static_cast<long long>(s.rounds()),
              static_cast<long long>(s.state_version()));
  if (!s.waiting_for().empty()) std::printf("waiting: %s\n", s.waiting_for().c_str());
  if (!s.follow_up().empty()) std::printf("follow-up: %s\n", s.follow_up().c_str());
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

std::shared_ptr<grpc::Channel> Channel(const ClientOptions& o,
                                       std::shared_ptr<grpc::ChannelCredentials> credentials) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  // A refused connection makes the channel re-resolve the coordinator's name, which gRPC allows
  // only every 30 s by default: a client then sat out up to ~20 s of a restarted coordinator.
  args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 500);
  for (const auto& [key, value] : common::TransportChannelArgs(o.node.chunk_bytes))
    args.SetInt(key, value);
  if (!o.tls_server_name.empty()) args.SetSslTargetNameOverride(o.tls_server_name);
  return grpc::CreateCustomChannel(o.coordinator, std::move(credentials), args);
}

absl::StatusOr<std::unique_ptr<Workload>> MakeWorkload(ClientOptions& o) {
  switch (o.workload) {
    case WorkloadKind::kRegression:
      o.regression.privacy = o.privacy;
      return std::make_unique<RegressionWorkload>(o.regression);
    case WorkloadKind::kCommand: {
      absl::StatusOr<std::vector<v1::ModuleSpec>> modules = ParseModuleList(o.modules);
      if (!modules.ok()) return modules.status();
      o.command.modules = *std::move(modules);
      o.command.examples = o.regression.examples;
      return std::make_unique<CommandWorkload>(o.command);
    }
    case WorkloadKind::kLlm: {
      o.llm.privacy = o.privacy;
      absl::StatusOr<std::unique_ptr<LlmWorkload>> llm = LlmWorkload::Create(o.llm);
      if (!llm.ok()) return llm.status();
      return std::unique_ptr<Workload>(*std::move(llm));
    }
  }
  return absl::InternalError("unknown workload");
}

}  // namespace

absl::Status ClientOptions::Validate() const {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(StrCat(parts...)); };
  if (privacy.target_epsilon > 0 && !privacy.enabled())
    return bad("--target-epsilon needs DP-SGD (--dp-noise-multiplier)");
  if (privacy.init_noise_multiplier >= 0 && !privacy.enabled())
    return bad("--dp-init-noise-multiplier needs DP-SGD (--dp-noise-multiplier)");
  if (privacy.enabled() && !(privacy.dp.clip > 0))
    return bad("--dp-clip must be > 0 (it is ", privacy.dp.clip, ")");
  if (privacy.enabled() && workload == WorkloadKind::kCommand) {
    return bad(
        "DP-SGD runs in the built-in trainers (--workload llm or regression); a command "
        "workload's program must do its own");
  }
  if (!insecure && ca.empty())
    return bad("TLS needs --ca (the CA of the coordinator's certificate), or --insecure");
  if (cert.empty() != key.empty())
    return bad("mutual TLS needs both --cert and --key (given: ", cert.empty() ? "--key" : "--cert",
               ")");
  if (workload == WorkloadKind::kCommand && !status && !status_json &&
      (command.command.empty() || command.base_model_sha256.empty() || modules.empty())) {
    return bad("the command workload needs --train-command, --base-model-sha256 and --modules");
  }
  if (workload == WorkloadKind::kLlm && !status && !status_json &&
      (llm.model_dir.empty() || llm.data.empty()))
    return bad("the llm workload needs --model DIR and --data FILE");
  if (node.chunk_bytes < 1024 || node.chunk_bytes > (64 << 20))
    return bad("--chunk-bytes is ", node.chunk_bytes, "; use 1 KiB to 64 MiB");
  if (!(node.max_retry_s > 0))
    return bad("--max-retry-s is ", node.max_retry_s, "; it must be > 0");
  return absl::OkStatus();
}

void AddClientFlags(CLI::App& app, ClientOptions& o) {
  app.set_config("--config", "", "TOML file of options (keys are the long flag names without --)");
  app.add_option("--coordinator", o.coordinator, "address:port of fedlora-server")
      ->capture_default_str();
  app.add_option("--ca", o.ca, "PEM CA that signed the coordinator's certificate");
  app.add_option("--cert", o.cert,
                 "PEM client certificate (mutual TLS; its common name is this client's identity)");
  app.add_option("--key", o.key, "PEM private key of --cert");
  app.add_option("--tls-server-name", o.tls_server_name,
                 "expected name in the coordinator's certificate, if not the host");
  app.add_flag("--insecure", o.insecure,
               "plaintext (only against a coordinator started with --insecure)");
  app.add_option(
      "--id", o.node.id,
      "client name, sent in the clear; only with --insecure (TLS names us by certificate)");
  const std::map<std::string, WorkloadKind> workloads = {{"regression", WorkloadKind::kRegression},
                                                         {"command", WorkloadKind::kCommand},
                                                         {"llm", WorkloadKind::kLlm}};
  app.add_option("--workload", o.workload, "what to train: regression | command | llm")
      ->transform(CLI::CheckedTransformer(workloads))
      ->default_str("regression");
  app.add_option("--model", o.llm.model_dir, "llm: the site's Hugging Face model directory");
  app.add_option("--data", o.llm.data, "llm: the site's training JSONL");
  app.add_option("--max-length", o.llm.max_length, "llm: tokens per record")->capture_default_str();
  app.add_option("--batch", o.llm.batch, "llm: records per micro-batch")->capture_default_str();
  app.add_option("--grad-accum", o.llm.grad_accum, "llm: micro-batches per optimiser step")
      ->capture_default_str();
  app.add_option("--eval-examples", o.llm.eval_examples,
                 "llm: records whose loss is reported before and after each round")
      ->capture_default_str();
  app.add_option("--threads", o.llm.threads, "llm: threads (0: all cores)")->capture_default_str();
  app.add_option("--dp-noise-multiplier", o.privacy.dp.noise_multiplier,
                 "regression, llm: DP-SGD noise stddev / clip (per-example clipping, Poisson "
                 "sampling); off when not given");
  app.add_option(
      "--dp-init-noise-multiplier", o.privacy.init_noise_multiplier,
      "DP-SGD: noise stddev / clip of each step of fed-sb's initialisation (every record "
      "at once); default: --dp-noise-multiplier");
  app.add_option("--dp-clip", o.privacy.dp.clip, "DP-SGD per-example clip norm")
      ->capture_default_str();
  app.add_option("--dp-sample-rate", o.privacy.dp.sample_rate,
                 "DP-SGD sampling rate (llm default: batch / records; regression default: 0.1)");
  app.add_option("--dp-delta", o.privacy.delta, "delta of the epsilon reported")
      ->capture_default_str();
  app.add_option("--target-epsilon", o.privacy.target_epsilon,
                 "DP-SGD: decline rounds (and leave the run) once the next one would pass this");
  app.add_option("--privacy-ledger", o.privacy.ledger, "where DP-SGD's spending is kept")
      ->capture_default_str();
  app.add_option("--train-command", o.command.command,
                 "command: the site's training program (see client/workloads/command_workload.h "
                 "for its contract)");
  app.add_option("--base-model-sha256", o.command.base_model_sha256,
                 "command: fingerprint of the site's base model");
  app.add_option("--modules", o.modules,
                 "command: adaptable layers, name:in_features:out_features,...");
  app.add_option("--work-dir", o.command.work_dir,
                 "command: where tasks and the program's outputs go")
      ->capture_default_str();
  app.add_option("--base-seed", o.regression.base_seed,
                 "regression: the base model (same for all clients)")
      ->capture_default_str();
  app.add_option("--data-seed", o.regression.data_seed, "regression: this client's data")
      ->capture_default_str();
  app.add_option("--layers", o.regression.layers)->capture_default_str();
  app.add_option("--in-features", o.regression.in_features)->capture_default_str();
  app.add_option("--out-features", o.regression.out_features)->capture_default_str();
  app.add_option("--examples", o.regression.examples)->capture_default_str();
  app.add_option("--heterogeneity", o.regression.heterogeneity,
                 "regression: size of the client-specific target")
      ->capture_default_str();
  app.add_option("--out-dir", o.node.out_dir, "write the final state here when the run is done");
  app.add_option("--chunk-bytes", o.node.chunk_bytes)->capture_default_str();
  app.add_option("--max-retry-s", o.node.max_retry_s, "give up on a call after retrying this long")
      ->capture_default_str();
  app.add_flag("--status", o.status,
               "print the coordinator's view of the run (round, phase, cohort, clients) and exit");
  app.add_flag("--status-json", o.status_json, "the same as JSON");
}

int ClientMain(int argc, char** argv,
               const std::function<void(CLI::App&, ClientOptions&)>& extend) {
  common::KeepOpenSslUntilExit();
  ClientOptions o;
  CLI::App app{"fedlora-client: a client node of a federated LoRA fine-tuning run"};
  app.footer(
      "Exit codes: 0 the run is done; 1 it failed; 2 bad options or files; 3 this client's "
      "identity "
      "is refused (certificate expired, not yet valid or not trusted; not admitted; or superseded "
      "by a later process with the same identity): retrying cannot help.");
  AddClientFlags(app, o);
  if (extend) extend(app, o);
  CLI11_PARSE(app, argc, argv);
  spdlog::set_default_logger(spdlog::stderr_color_mt("client"));
  spdlog::set_pattern(
      fmt::format("%Y-%m-%dT%H:%M:%S.%e %^%l%$ [{}] %v", o.node.id.empty() ? "client" : o.node.id));
  if (absl::Status st = o.Validate(); !st.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(st.message()).c_str());
    return 2;
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::InsecureChannelCredentials();
  if (o.insecure) {
    spdlog::warn("--insecure: plaintext to {}; updates and identity travel unprotected",
                 o.coordinator);
  } else {
    auto tls = common::ClientTlsCredentials(o.ca, o.cert, o.key);
    if (!tls.ok()) {  // its certificate's dates are FAILED_PRECONDITION: refused by any coordinator
      std::fprintf(stderr, "error: %s\n", std::string(tls.status().message()).c_str());
      return absl::IsFailedPrecondition(tls.status()) ? kExitRefused : 2;
    }
    credentials = *tls;
    // gRPC reports a coordinator's refusal of this client's certificate only as "Socket closed"
    // (a handshake it did not like, as "handshake"): then a handshake of our own, at most every
    // 10 s, tells why.
    o.node.diagnose_refusal =
        [&o, last = std::chrono::steady_clock::time_point()](const grpc::Status& failure) mutable {
          const std::string& message = failure.error_message();
          const auto now = std::chrono::steady_clock::now();
          if ((message.find("Socket closed") == std::string::npos &&
               message.find("andshake") == std::string::npos) ||
              now - last < std::chrono::seconds(10))
            return absl::OkStatus();
          last = now;
          return common::ProbeTlsRefusal(o.coordinator, o.ca, o.cert, o.key);
        };
  }
  const std::shared_ptr<grpc::Channel> channel = Channel(o, std::move(credentials));
  if (o.status || o.status_json) {
    return PrintStatus(channel, o.insecure ? o.node.id : "", o.status_json,
                       o.node.diagnose_refusal);
  }

  absl::StatusOr<std::unique_ptr<Workload>> workload = MakeWorkload(o);
  if (!workload.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(workload.status().message()).c_str());
    return 2;
  }
  common::StopOnSignals signals;
  Node node(channel, o.node, *std::move(workload));
  absl::Status status = node.Run(signals.stop());
  if (!status.ok() && !absl::IsCancelled(status)) {
    std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
    return ExitCodeFor(status);
  }
  return 0;
}

}  // namespace fedlora::client
