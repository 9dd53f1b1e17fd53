// fedlora-client's program: parses and checks the options (client_options.cc), then prints the
// run's status, acts on it as an operator, or takes part in it with the chosen workload.
#include <google/protobuf/util/json_util.h>
#include <grpcpp/grpcpp.h>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <map>

#include "client/client_options.h"
#include "common/base/signals.h"
#include "common/base/strings.h"
#include "common/net/grpc_log.h"
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

// What fedlora-client says and exits with when the coordinator answered `what` with `st`:
// `diagnose` tells a refused certificate from a coordinator that went away.
int Failed(const grpc::Status& st, const char* what,
           const std::function<absl::Status(const grpc::Status&)>& diagnose) {
  absl::Status failure = diagnose ? diagnose(st) : absl::OkStatus();
  if (!absl::IsPermissionDenied(failure))
    failure = absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  std::fprintf(stderr, "error: %s: %s\n", what, std::string(failure.message()).c_str());
  return ExitCodeFor(failure);
}

grpc::ClientContext& Prepare(grpc::ClientContext& context, const std::string& insecure_id) {
  if (!insecure_id.empty()) context.AddMetadata(common::kClientIdMetadata, insecure_id);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return context;
}

// --admin: an operator's action; prints what the coordinator did.
int Administer(const std::shared_ptr<grpc::Channel>& channel, const ClientOptions& o) {
  v1::AdminRequest request;
  v1::AdminRequest::Action action = v1::AdminRequest::ACTION_UNSPECIFIED;
  std::string name = o.admin;
  std::transform(name.begin(), name.end(), name.begin(), ::toupper);
  v1::AdminRequest::Action_Parse(name, &action);
  request.set_action(action);
  request.set_client(o.admin_client);
  request.set_reason(o.admin_reason);
  grpc::ClientContext context;
  v1::AdminResponse response;
  if (grpc::Status st =
          v1::Coordinator::NewStub(channel)->Admin(&Prepare(context, ""), request, &response);
      !st.ok())
    return Failed(st, "the coordinator refused the action", o.node.diagnose_refusal);
  std::printf("%s\n", response.done().c_str());
  return 0;
}

// --status: the run as the coordinator sees it, for operators (any identity it accepts may ask,
// when it has no operator list).
int PrintStatus(const std::shared_ptr<grpc::Channel>& channel, const std::string& insecure_id,
                bool json, const std::function<absl::Status(const grpc::Status&)>& diagnose) {
  grpc::ClientContext context;
  v1::StatusResponse s;
  if (grpc::Status st = v1::Coordinator::NewStub(channel)->GetStatus(&Prepare(context, insecure_id),
                                                                     v1::StatusRequest(), &s);
      !st.ok())
    return Failed(st, "the coordinator's status", diagnose);
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
  std::printf("%-24s %10s %8s %8s %14s\n", "client", "examples", "rounds", "rejected", "last seen");
  const int64_t now_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                             std::chrono::system_clock::now().time_since_epoch())
                             .count();
  for (const auto& c : s.clients()) {
    std::printf("%-24s %10lld %8lld %8lld %12.1fs ago%s\n", c.id().c_str(),
                static_cast<long long>(c.num_examples()),
                static_cast<long long>(c.rounds_contributed()),
                static_cast<long long>(c.rejected_updates()),
                static_cast<double>(now_ms - c.last_seen_unix_ms()) / 1000.0,
                c.removed().empty() ? "" : ("  " + c.removed()).c_str());
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
  common::RouteGrpcLog();
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
    o.node.cert_file = o.cert;
    o.node.key_file = o.key;
    o.node.peer_ca_file = o.ca;
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
  if (!o.admin.empty()) return Administer(channel, o);
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
