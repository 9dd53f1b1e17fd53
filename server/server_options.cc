#include "server/server_options.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/numbers.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/gguf.h"

namespace fedlora::server {
using common::StrCat;

namespace {
// A setting that cannot be used, and why.
absl::Status Invalid(const auto&... parts) { return absl::InvalidArgumentError(StrCat(parts...)); }
}  // namespace

absl::Status ServerOptions::Validate() const {
  RETURN_IF_ERROR(ValidateRounds());
  RETURN_IF_ERROR(ValidateModel());
  RETURN_IF_ERROR(ValidatePrivacy());
  RETURN_IF_ERROR(ValidateSecureAggregation());
  return ValidateTransport();
}

nlohmann::json ServerOptions::Settings() const {
  nlohmann::json s = {{"method", common::MethodName(method)},
                      {"rounds", rounds},
                      {"rank", rank},
                      {"lora_alpha", lora_alpha},
                      {"local_steps", local_steps},
                      {"learning_rate", learning_rate},
                      {"min_clients", min_clients},
                      {"fraction", fraction},
                      {"quorum", quorum},
                      {"round_deadline_s", round_deadline_s},
                      {"client_timeout_s", client_timeout_s},
                      {"max_update_norm_ratio", norm_ratio()},
                      {"secure_aggregation", secure_aggregation},
                      {"max_rejections", max_rejections},
                      {"max_client_weight", max_client_weight},
                      {"transport", insecure            ? "plaintext"
                                    : client_ca.empty() ? "TLS"
                                                        : "mutual TLS"},
                      {"pin_client_certs", pin_client_certs},
                      {"evaluation", eval_data.empty() ? "none" : "held-out data"}};
  if (client_dp()) {
    s["dp_clip"] = dp_clip;
    s["dp_noise_multiplier"] = dp_noise_multiplier;
    s["dp_delta"] = dp_delta;
    if (dp_target_epsilon > 0) s["dp_target_epsilon"] = dp_target_epsilon;
  }
  return s;
}

// Rounds, cohorts and what an update may be.
absl::Status ServerOptions::ValidateRounds() const {
  if (rounds < 1) return Invalid("rounds is ", rounds, "; it must be at least 1");
  if (min_clients < 1) return Invalid("min_clients is ", min_clients, "; it must be at least 1");
  if (!(fraction > 0 && fraction <= 1))
    return Invalid("fraction is ", fraction, "; it must be in (0, 1]");
  if (!(quorum > 0 && quorum <= 1)) return Invalid("quorum is ", quorum, "; it must be in (0, 1]");
  if (min_cohort < 1) return Invalid("min_cohort is ", min_cohort, "; it must be at least 1");
  if (!(round_deadline_s > 0))
    return Invalid("round_deadline_s is ", round_deadline_s, "; it must be > 0");
  if (!(client_timeout_s > 0))
    return Invalid("client_timeout_s is ", client_timeout_s, "; it must be > 0");
  if (rank < 1) return Invalid("rank is ", rank, "; it must be at least 1");
  if (local_steps < 1) return Invalid("local_steps is ", local_steps, "; it must be at least 1");
  if (!(max_client_weight > 0 && max_client_weight <= 1))
    return Invalid("max_client_weight is ", max_client_weight, "; it must be in (0, 1] (1: off)");
  if (!(max_update_norm >= 0))
    return Invalid("max_update_norm is ", max_update_norm, "; it must be >= 0 (0: off)");
  if (!(max_update_norm_ratio == 0 || max_update_norm_ratio >= 1)) {
    return Invalid("max_update_norm_ratio is ", max_update_norm_ratio,
                   "; it must be >= 1 (a multiple of the round's median update norm) or 0 (off)");
  }
  if (max_rejections < 0)
    return Invalid("max_rejections is ", max_rejections, "; it must be >= 0 (0: never remove)");
  if (max_client_examples < 1)
    return Invalid("max_client_examples is ", max_client_examples, "; it must be at least 1");
  if (!(learning_rate > 0)) return Invalid("learning_rate is ", learning_rate, "; it must be > 0");
  return absl::OkStatus();
}

// The base model, its evaluation and export, FLoRA's ranks, Fed-SB's initialisation.
absl::Status ServerOptions::ValidateModel() const {
  if (!eval_data.empty() && base_model_dir.empty())
    return Invalid("eval_data ", eval_data,
                   " needs base_model_dir (the model to evaluate it with)");
  if (!export_gguf.empty()) {
    if (base_model_dir.empty())
      return Invalid("export_gguf needs base_model_dir (the model the GGUF files hold)");
    if (auto type = common::ParseGgmlType(export_gguf); !type.ok())
      return Invalid("export_gguf: ", type.status().message());
  }
  if (!client_ranks.empty() && method != common::Method::kFlora)
    return Invalid("client_ranks needs method flora: ", common::MethodName(method),
                   "'s global factors have one rank (", rank, ") that every client trains");
  for (const auto& [id, r] : client_ranks) {
    if (r < 1 || r > 65536)
      return Invalid("client_ranks: ", id, "'s rank is ", r, "; use 1 to 65536");
    if (!allowed_clients.empty() &&
        std::find(allowed_clients.begin(), allowed_clients.end(), id) == allowed_clients.end())
      return Invalid("client_ranks names ", id, ", which is not an allowed client");
  }
  if (eval_max_length < 2)
    return Invalid("eval_max_length is ", eval_max_length, "; it must be >= 2");
  if (eval_accuracy && eval_data.empty())
    return Invalid("eval_accuracy needs eval_data (records with an \"answer\" field)");
  if (eval_max_new_tokens < 1)
    return Invalid("eval_max_new_tokens is ", eval_max_new_tokens, "; it must be >= 1");
  if (!(lora_fair_lambda >= 0))
    return Invalid("lora_fair_lambda is ", lora_fair_lambda, "; it must be >= 0");
  if (fed_sb_init != "sketch" && fed_sb_init != "dense" && fed_sb_init != "random")
    return Invalid("fed_sb_init is '", fed_sb_init, "'; it must be sketch, dense or random");
  if (fed_sb_oversampling < 0 || fed_sb_power_iterations < 0 || fed_sb_init_examples < 1 ||
      !(fed_sb_init_lr > 0)) {
    return Invalid(
        "fed-sb initialisation needs oversampling >= 0, power iterations >= 0, examples >= 1 "
        "and a learning rate > 0; got ",
        fed_sb_oversampling, ", ", fed_sb_power_iterations, ", ", fed_sb_init_examples, " and ",
        fed_sb_init_lr);
  }
  return absl::OkStatus();
}

// Client-level DP.
absl::Status ServerOptions::ValidateSecureAggregation() const {
  if (secure_aggregation != "off" && secure_aggregation != "secagg+")
    return Invalid("secure_aggregation is '", secure_aggregation, "'; expected off or secagg+");
  if (!secure()) return absl::OkStatus();
  const std::string_view why = "under secure aggregation, which shows the coordinator no update";
  if (method == common::Method::kFlora)
    return Invalid(
        "flora cannot run with secure aggregation: stacking needs each client's own "
        "factors, and the coordinator learns only their sum");
  if (max_update_norm > 0)
    return Invalid("max_update_norm cannot be checked ", why, "; the clients clip to ",
                   client_dp() ? "dp_clip" : "secagg_clip", " instead");
  if (max_update_norm_ratio > 0 && max_update_norm_ratio != ServerOptions().max_update_norm_ratio)
    return Invalid("max_update_norm_ratio cannot be applied ", why,
                   " (it needs each update's norm); the clients clip instead");
  if (dp_adaptive_clip) return Invalid("dp_adaptive_clip needs each client's clipping bit ", why);
  if (!client_ranks.empty()) return Invalid("client_ranks cannot be used ", why);
  if (!(secagg_dropout >= 0 && secagg_dropout < 1) || !(secagg_corrupt >= 0 && secagg_corrupt < 1))
    return Invalid("secagg_dropout and secagg_corrupt must be in [0, 1); got ", secagg_dropout,
                   " and ", secagg_corrupt);
  if (secagg_corrupt + 2 * secagg_dropout > 0.9)
    return Invalid("secagg_corrupt + 2·secagg_dropout is ", secagg_corrupt + 2 * secagg_dropout,
                   "; no secure graph exists above 0.9");
  if (!(secagg_clip > 0) || !std::isfinite(secagg_clip))
    return Invalid("secagg_clip is ", secagg_clip, "; it must be > 0");
  if (!(secagg_step_timeout_s > 0))
    return Invalid("secagg_step_timeout_s is ", secagg_step_timeout_s, "; it must be > 0");
  if (insecure || client_ca.empty())
    return Invalid(
        "secure aggregation needs mutual TLS (client_ca): clients sign their keys "
        "with their certificates' keys, so the coordinator cannot substitute them");
  if (min_clients < 3 || (fraction < 1 && min_cohort < 3))
    return Invalid(
        "secure aggregation needs cohorts of at least 3 clients (with two, each "
        "learns the other's update from the sum): set min_clients to 3 or more",
        fraction < 1 ? ", and min_cohort to 3 or more" : "", "; got min_clients ", min_clients,
        ", min_cohort ", min_cohort);
  return absl::OkStatus();
}

absl::Status ServerOptions::ValidatePrivacy() const {
  if (!(dp_clip >= 0)) return Invalid("dp_clip is ", dp_clip, "; it must be >= 0 (0: off)");
  if (!(dp_noise_multiplier >= 0))
    return Invalid("dp_noise_multiplier is ", dp_noise_multiplier, "; it must be >= 0");
  if (!(dp_init_noise_multiplier >= 0 || dp_init_noise_multiplier == -1))
    return Invalid("dp_init_noise_multiplier is ", dp_init_noise_multiplier,
                   "; it must be >= 0, or -1 for dp_noise_multiplier's");
  if (!client_dp() && (dp_noise_multiplier > 0 || dp_adaptive_clip || dp_target_epsilon > 0 ||
                       dp_init_noise_multiplier >= 0)) {
    return Invalid(
        "client-level DP needs dp_clip > 0 (the bound on each client's update, the initial one "
        "with dp_adaptive_clip)");
  }
  if (client_dp() && method == common::Method::kFlora) {
    return Invalid(
        "flora cannot run with client-level DP: the coordinator needs each client's own factors "
        "to stack them, so no sum can be noised. Use DP-SGD on the clients instead "
        "(fedlora-client --dp-noise-multiplier, --dp-clip)");
  }
  if (!(dp_delta > 0 && dp_delta < 1))
    return Invalid("dp_delta is ", dp_delta, "; it must be in (0, 1)");
  if (!(dp_target_epsilon >= 0))
    return Invalid("dp_target_epsilon is ", dp_target_epsilon, "; it must be >= 0 (0: none)");
  if (dp_target_epsilon > 0 && dp_noise_multiplier == 0) {
    return Invalid("dp_target_epsilon needs dp_noise_multiplier > 0: without noise ε is infinite");
  }
  if (!(dp_target_quantile >= 0 && dp_target_quantile <= 1))
    return Invalid("dp_target_quantile is ", dp_target_quantile, "; it must be in [0, 1]");
  if (!(dp_clip_learning_rate >= 0))
    return Invalid("dp_clip_learning_rate is ", dp_clip_learning_rate, "; it must be >= 0");
  if (dp_adaptive_clip && dp_noise_multiplier > 0 && dp_count_stddev >= 0 &&
      dp_noise_multiplier >= 2 * dp_count_stddev) {
    return Invalid("dp_noise_multiplier ", dp_noise_multiplier,
                   " must be below 2*dp_count_stddev = ", 2 * dp_count_stddev,
                   ": the noised count of unclipped updates takes its share of the round's budget");
  }
  return absl::OkStatus();
}

// Failures, transfers, TLS and identities.
absl::Status ServerOptions::ValidateTransport() const {
  if (!(give_up_after_s > 0))
    return Invalid("give_up_after_s is ", give_up_after_s, "; it must be > 0");
  if (chunk_bytes < 1024 || chunk_bytes > (64 << 20))
    return Invalid("chunk_bytes is ", chunk_bytes, "; use 1 KiB to 64 MiB");
  if (!insecure && (tls_cert.empty() || tls_key.empty())) {
    return Invalid(
        "TLS needs tls_cert and tls_key (PEM files); deploy/make_certs.sh makes a CA and "
        "certificates. "
        "Only for experiments on one machine: --insecure");
  }
  if (insecure && !client_ca.empty())
    return Invalid("client_ca (mutual TLS) cannot be combined with insecure");
  if ((!allowed_clients.empty() || !operators.empty()) && client_ca.empty()) {
    return Invalid(
        "allowed_clients and operators need client_ca: without mutual TLS there are no client "
        "identities to check");
  }
  if ((!crl.empty() || pin_client_certs) && client_ca.empty()) {
    return Invalid(
        "crl and pin_client_certs need client_ca: without mutual TLS there are no client "
        "certificates to check");
  }
  for (const std::string& id : operators) {
    if (std::find(allowed_clients.begin(), allowed_clients.end(), id) != allowed_clients.end())
      return Invalid(
          "'", id, "' is both an allowed client and an operator; an identity is one or the other");
  }
  if (metrics_listen.empty()) {
    if (!metrics_token_file.empty()) return Invalid("metrics_token_file needs metrics_listen");
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(const HostPort at, ParseHostPort(metrics_listen, "metrics_listen"));
  if (IsLoopback(at.host)) return absl::OkStatus();
  if (insecure) {
    return Invalid("metrics_listen ", metrics_listen,
                   " is off the loopback interface: it is served over TLS only, which insecure "
                   "turns off; listen on 127.0.0.1 or use TLS");
  }
  if (metrics_token_file.empty() && (client_ca.empty() || operators.empty())) {
    return Invalid("metrics_listen ", metrics_listen,
                   " is off the loopback interface: say who may read it, with operators (and "
                   "client_ca: their certificates) or metrics_token_file (a bearer token)");
  }
  return absl::OkStatus();
}

bool IsLoopback(const std::string& host) {
  if (host == "localhost") return true;
  in_addr v4{};
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) return (ntohl(v4.s_addr) >> 24) == 127;
  in6_addr v6{};
  return inet_pton(AF_INET6, host.c_str(), &v6) == 1 && IN6_IS_ADDR_LOOPBACK(&v6);
}

absl::StatusOr<HostPort> ParseHostPort(std::string_view address, std::string_view key) {
  const auto bad = [&](std::string_view why) {
    return absl::InvalidArgumentError(StrCat(key, " '", address, "' ", why,
                                             "; expected HOST:PORT or [IPv6]:PORT, e.g. "
                                             "127.0.0.1:9464"));
  };
  const size_t colon = address.rfind(':');
  if (colon == std::string_view::npos || colon == 0) return bad("has no host and port");
  HostPort hp;
  hp.host = std::string(address.substr(0, colon));
  if (hp.host.front() == '[') {
    if (hp.host.size() < 3 || hp.host.back() != ']') return bad("has an unclosed [");
    hp.host = hp.host.substr(1, hp.host.size() - 2);
  } else if (hp.host.find(':') != std::string::npos) {
    return bad("has an IPv6 host without brackets");
  }
  const std::string_view port = address.substr(colon + 1);
  if (port.empty() || port.size() > 5 || !std::all_of(port.begin(), port.end(), ::isdigit) ||
      std::stoi(std::string(port)) > 65535)
    return bad("has no port in [0, 65535]");
  hp.port = std::stoi(std::string(port));
  return hp;
}

namespace {

// The run, its rounds and cohorts, and what clients train.
void AddRunFlags(CLI::App& app, ServerOptions& o) {
  std::map<std::string, common::Method> methods;
  for (common::Method m : common::kAllMethods) methods.emplace(common::MethodName(m), m);
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
  app.add_option_function<std::vector<std::string>>(
         "--client-ranks",
         [&o](const std::vector<std::string>& pairs) {
           for (const std::string& pair : pairs) {
             const size_t eq = pair.find('=');
             int rank = 0;
             if (eq == std::string::npos || eq == 0 ||
                 !absl::SimpleAtoi(absl::string_view(pair).substr(eq + 1), &rank))
               throw CLI::ValidationError("--client-ranks", "expected id=rank, got '" + pair + "'");
             o.client_ranks[pair.substr(0, eq)] = rank;
           }
         },
         "flora: clients that train another rank than --rank, as id=rank,id=rank")
      ->delimiter(',');
  app.add_option("--local-steps", o.local_steps)->capture_default_str();
  app.add_option("--learning-rate", o.learning_rate)->capture_default_str();
  app.add_option("--target-modules", o.target_modules,
                 "module name suffixes to adapt (default: all offered)")
      ->delimiter(',')
      ->allow_extra_args(false);
}

// What an update may do to the aggregate.
void AddBoundFlags(CLI::App& app, ServerOptions& o) {
  app.add_option("--max-client-examples", o.max_client_examples,
                 "a client joining with more examples is refused; an update may not claim more "
                 "than its client joined with")
      ->capture_default_str();
  app.add_option("--max-client-weight", o.max_client_weight,
                 "largest share of a round's aggregate one client can have (1: off)")
      ->capture_default_str();
  app.add_option(
         "--max-rejections", o.max_rejections,
         "remove from the run a client with a rejected update in this many rounds; 0: never")
      ->capture_default_str();
  app.add_option("--max-update-norm", o.max_update_norm,
                 "reject an update whose ‖s·B·A‖_F (flat over modules) exceeds this; 0: off")
      ->capture_default_str();
  app.add_option("--max-update-norm-ratio", o.max_update_norm_ratio,
                 "leave out of a round's aggregate an update whose ‖s·B·A‖_F exceeds this multiple "
                 "of the round's median (>= 1); 0: off")
      ->capture_default_str();
}

// The method's settings, the base model, its evaluation and export.
void AddModelFlags(CLI::App& app, ServerOptions& o) {
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
  app.add_option("--export-gguf", o.export_gguf,
                 "with --base-model-dir, also export the merged model (its weights in this type: "
                 "f32, f16, bf16, q8_0) and the adapter as GGUF for llama.cpp and Ollama");
  app.add_option("--eval-data", o.eval_data, "held-out JSONL evaluated after every round");
  app.add_option("--eval-max-length", o.eval_max_length, "tokens per held-out record")
      ->capture_default_str();
  app.add_flag("--eval-accuracy", o.eval_accuracy,
               "also score greedy answers to --eval-data's records with an \"answer\" field "
               "(exact match, as fedlora eval --accuracy)");
  app.add_option("--eval-max-new-tokens", o.eval_max_new_tokens,
                 "--eval-accuracy: tokens per generated answer")
      ->capture_default_str();
}

void AddPrivacyFlags(CLI::App& app, ServerOptions& o) {
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
}

void AddSecureAggregationFlags(CLI::App& app, ServerOptions& o) {
  app.add_option("--secure-aggregation", o.secure_aggregation,
                 "secagg+: the coordinator learns only the sum of the clients' masked, quantised "
                 "changes (needs mutual TLS); off")
      ->capture_default_str();
  app.add_option("--secagg-dropout", o.secagg_dropout,
                 "secure aggregation: share of a cohort expected to drop during the protocol")
      ->capture_default_str();
  app.add_option("--secagg-corrupt", o.secagg_corrupt,
                 "secure aggregation: share of a cohort that may collude with the coordinator")
      ->capture_default_str();
  app.add_option("--secagg-clip", o.secagg_clip,
                 "secure aggregation without client-level DP: bound on each client's change "
                 "(flat L2)")
      ->capture_default_str();
  app.add_option("--secagg-step-timeout-s", o.secagg_step_timeout_s,
                 "secure aggregation: a protocol step after training closes at this age")
      ->capture_default_str();
}

void AddTransportFlags(CLI::App& app, ServerOptions& o) {
  app.add_option("--listen", o.listen, "address:port (port 0 picks a free one)")
      ->capture_default_str();
  app.add_option("--tls-cert", o.tls_cert, "PEM certificate chain of the server");
  app.add_option("--tls-key", o.tls_key, "PEM private key of the server");
  app.add_option("--client-ca", o.client_ca, "PEM CA of client certificates: enables mutual TLS");
  app.add_option("--allowed-clients", o.allowed_clients, "client certificate common names admitted")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_option("--operators", o.operators,
                 "certificate common names that may ask for the status and may not train (empty: "
                 "any admitted client may ask)")
      ->delimiter(',')
      ->allow_extra_args(false);
  app.add_option("--crl", o.crl,
                 "PEM CRLs of the client CA: revoked certificates are refused at every call; read "
                 "again on SIGHUP");
  app.add_flag("--pin-client-certs", o.pin_client_certs,
               "admit each identity only with the certificate it first joined with");
  app.add_flag("--insecure", o.insecure,
               "plaintext without client identities (experiments on one machine only)");
  app.add_option("--metrics-listen", o.metrics_listen,
                 "HOST:PORT of /metrics (Prometheus) and the live page at /; off the loopback "
                 "interface: HTTPS for --operators or --metrics-token-file only");
  app.add_option("--metrics-token-file", o.metrics_token_file,
                 "file holding a bearer token that /metrics and the page then require");
  app.add_option("--chunk-bytes", o.chunk_bytes)->capture_default_str();
  app.add_option("--max-update-bytes", o.max_update_bytes)->capture_default_str();
  app.add_option("--max-wait-ms", o.max_wait_ms, "longest long poll")->capture_default_str();
  app.add_option("--give-up-after-s", o.give_up_after_s,
                 "a round's commit (or its metrics or export) failing this long stops the server")
      ->capture_default_str();
}

}  // namespace

void AddServerFlags(CLI::App& app, ServerOptions& o) {
  AddRunFlags(app, o);
  AddBoundFlags(app, o);
  AddModelFlags(app, o);
  AddPrivacyFlags(app, o);
  AddSecureAggregationFlags(app, o);
  AddTransportFlags(app, o);
}

}  // namespace fedlora::server
