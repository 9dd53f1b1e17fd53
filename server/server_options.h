// fedlora-server's options: every key of the TOML config file is also a flag (flags win).
// Validate() says what is wrong with a combination before anything starts.
#ifndef FEDLORA_SERVER_SERVER_OPTIONS_H_
#define FEDLORA_SERVER_SERVER_OPTIONS_H_

#include <CLI/CLI.hpp>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"

namespace fedlora::server {

struct HostPort {
  std::string host;  // without the brackets of an IPv6 address
  int port = 0;
};
// HOST:PORT or [IPv6]:PORT, with a port in [0, 65535]; errors name `key`.
absl::StatusOr<HostPort> ParseHostPort(std::string_view address, std::string_view key);
// Whether `host` names the loopback interface: localhost, 127.0.0.0/8 or ::1.
bool IsLoopback(const std::string& host);

struct ServerOptions {
  // Run
  common::Method method = common::Method::kFedIt;
  int rounds = 3;
  uint64_t seed = 0;  // cohorts, initial factors, task seeds: a run with the same seed repeats
  std::string state_dir = "fedlora-state";
  // Cohorts and rounds
  int min_clients = 2;    // joined clients needed before the first round starts
  double fraction = 1.0;  // share of joined clients sampled into each cohort
  int min_cohort = 1;     // at least this many per cohort (capped by the joined count)
  double quorum = 1.0;    // share of the cohort whose updates close a round at its deadline
  // a round closes at this age with at least the quorum; retried without it
  double round_deadline_s = 600;
  // a cohort member silent this long (no heartbeat) is counted as dropped
  double client_timeout_s = 60;
  // Training settings sent to clients
  int rank = 8;
  double lora_alpha = 16;
  // FLoRA's heterogeneous ranks: client id → the rank it trains (others train `rank`), each with
  // scaling lora_alpha / its rank. FLoRA stacks any mix of ranks exactly; the other methods keep
  // one rank, as their global factors have one.
  std::map<std::string, int> client_ranks;
  int local_steps = 20;
  double learning_rate = 0.05;
  // module name suffixes to adapt (e.g. q_proj); empty: all offered
  std::vector<std::string> target_modules;
  // A client joining with more examples is refused, and an update claiming more examples than its
  // client joined with is rejected: a client's weight in the aggregate is bounded by both.
  int64_t max_client_examples = 1'000'000'000;
  // > 0: an update whose ‖s·B·A‖_F (s·B·R·A for fed-sb; flat over its modules — the adapter a
  // client sends, not its change) exceeds this is rejected: a bound on what one faulty or
  // malicious client can do to the aggregate without DP. 0: off.
  double max_update_norm = 0;
  // >= 1: when a round closes, an accepted update whose norm (as above) exceeds this multiple of
  // the lower median of the round's accepted norms is left out of the aggregate and reported as
  // rejected (in the metrics line's "norm_outliers"). The bound follows the updates' scale, which
  // drifts over a run. On by default: honest updates of the project's federations stay within
  // the ratio tests/bench/README.md reports, a scaled or poisoned one does not. Not applied with
  // client-level DP, whose clipping bounds every update already. 0: off.
  double max_update_norm_ratio = 10;
  // > 0: a client with a rejected update (refused by the update gate, or left out as a norm
  // outlier) in this many rounds of a run is removed from it: it leaves the round's cohort and
  // quorum, and its further calls are refused with the reason. 0: never.
  int max_rejections = 3;
  // < 1: no client's share of a round's aggregate exceeds this (of the cohort drawn): weights are
  // min(examples, T) with T from the members' joined counts (cohort.h, WeightCap). 1: off.
  double max_client_weight = 1;
  // the base model clients must hold; empty: pinned from the first client
  std::string base_model_sha256;
  double lora_fair_lambda = 0.01;
  // Fed-SB's initialisation (LoRA-SB: B, A and R0 from the top-r singular subspace of the clients'
  // gradient, before round 1): "sketch" (a federated randomized SVD: 2 + 2·q steps, each client
  // sending O((m + n)(r + o)) floats per module), "dense" (each client sends its m×n gradient once;
  // sign() as LoRA-SB applies it) or "random" (orthonormal B and A from the seed, R0 = 0).
  std::string fed_sb_init = "sketch";
  int fed_sb_oversampling = 8;      // o: the sketch's width is r + o
  int fed_sb_power_iterations = 1;  // q
  int fed_sb_init_examples = 64;    // records of each client's data its gradient is taken over
  double fed_sb_init_lr = 1e-3;  // η of the first full step −η·sign(G) the start approximates
  // The base model's Hugging Face directory (llm workload). With it the coordinator pins the run to
  // its fingerprint, evaluates the global model on eval_data after every round (eval_loss in the
  // metrics) and exports merged weights (export/merged).
  std::string base_model_dir;
  // With base_model_dir: the export also holds export/gguf/model.gguf (the merged model, its 2-D
  // weights in this type: f32, f16, bf16 or q8_0) and export/gguf/adapter.gguf (the global adapter
  // as a llama.cpp LoRA adapter), for llama.cpp and Ollama. Empty: no GGUF.
  std::string export_gguf;
  std::string eval_data;      // held-out JSONL; needs base_model_dir
  int eval_max_length = 256;  // tokens per held-out record
  // Also the global model's accuracy on eval_data's records with an "answer" (greedy responses
  // of at most eval_max_new_tokens, scored by exact match as `fedlora eval --accuracy` does):
  // eval_accuracy in the metrics.
  bool eval_accuracy = false;
  int eval_max_new_tokens = 32;
  // Client-level differential privacy (DP-FedAvg, McMahan et al. 2018; fedit, lora-fair, fed-sb):
  // each client's change of the trained factors is clipped to dp_clip (flat L2 over all modules),
  // the sums get Gaussian noise of stddev dp_noise_multiplier·clip, and the divisor is the cohort
  // drawn, not the count that arrived. Off while dp_clip is 0. ε for dp_delta is reported after
  // every round, with the sampling rate q = cohort / joined clients.
  double dp_clip = 0;               // S; with dp_adaptive_clip, the initial C
  double dp_noise_multiplier = 0;   // z of each round as a whole (0: clipping only, not private)
  bool dp_adaptive_clip = false;    // Andrew et al. 2021: C follows a quantile of the update norms
  double dp_target_quantile = 0.5;  // γ, the share of updates meant to end up unclipped
  double dp_clip_learning_rate = 0.2;  // η_C of C ← C·exp(−η_C (b̄ − γ))
  double dp_count_stddev = -1;         // σ_b of the noised unclipped count; < 0: cohort size / 20
  double dp_delta = 1e-5;
  double dp_target_epsilon = 0;  // > 0: the run ends before a round would take ε past this
  // z of each step of Fed-SB's initialisation from the clients' gradient (each a full-cohort
  // Gaussian mechanism on unit-norm answers); -1 (the default): dp_noise_multiplier.
  double dp_init_noise_multiplier = -1;
  double init_noise_multiplier() const {
    return dp_init_noise_multiplier >= 0 ? dp_init_noise_multiplier : dp_noise_multiplier;
  }
  // Secure aggregation (SecAgg+ with distributed DP; ALGORITHMS.md): "secagg+" or "off". The
  // coordinator then learns only the sum of the cohort's quantised changes, each client clipped to
  // secagg_clip (dp_clip under client-level DP, whose noise the clients then add, σ/√cohort each).
  // The graph is chosen for the assumed dropout and corrupt rates. Not for flora (stacking needs
  // each client's factors), nor with the norm bounds, adaptive clipping or client_ranks.
  std::string secure_aggregation = "off";
  double secagg_dropout = 0.05;  // δ: share of a cohort expected to drop during the protocol
  double secagg_corrupt = 0.05;  // γ: share of a cohort that may collude with the coordinator
  double secagg_clip = 10;       // without client-level DP: the bound on each client's change
  // A step of the protocol after training (shares, masked input, consent, reveal) closes once
  // every client it waits for has answered, every missing one is silent, or at this age.
  double secagg_step_timeout_s = 60;
  bool secure() const { return secure_aggregation != "off"; }
  // The median-ratio bound in effect: none under client-level DP or secure aggregation.
  double norm_ratio() const { return client_dp() || secure() ? 0 : max_update_norm_ratio; }
  // Transport
  std::string listen = "0.0.0.0:50051";
  std::string tls_cert;   // PEM server certificate chain
  std::string tls_key;    // PEM private key
  std::string client_ca;  // PEM CA of client certificates: set → mutual TLS, client certs required
  // client certificate common names admitted; empty: any the CA signed
  std::vector<std::string> allowed_clients;
  // Identities that may ask for the run's status (GetStatus), and may not train; empty: any client
  // admitted may ask. Needs client_ca.
  std::vector<std::string> operators;
  // PEM file of CRLs of the client CA: a certificate it revokes is refused at every call (read
  // again on SIGHUP; `fedlora certs revoke` writes one). Needs client_ca.
  std::string crl;
  // Each identity is admitted only with the certificate it first joined with (server/cert_pins.h).
  bool pin_client_certs = false;
  bool insecure = false;  // plaintext, no client identity: for experiments on one machine only
  // HOST:PORT of the HTTP listener of /metrics (Prometheus) and the live page (port 0: one the
  // system picks); empty: none. Off the loopback interface it needs TLS, and operators (client_ca
  // and operators) or a bearer token (metrics_token_file).
  std::string metrics_listen;
  std::string metrics_token_file;  // holds the bearer token /metrics and the page ask for
  // transfer chunk size: what each concurrent transfer holds in memory
  int64_t chunk_bytes = 1 << 20;
  int64_t max_update_bytes = int64_t{1} << 30;  // an update larger than this is refused
  int64_t max_wait_ms = 20000;                  // longest long-poll
  // A round's commit, or what follows it (evaluation, metrics line, export), that keeps failing —
  // a full disk, say — is retried with backoff (0.5 s doubling to 30 s) for this long; then the
  // coordinator stops with an error that says what to fix. Nothing is lost either way.
  double give_up_after_s = 600;

  bool client_dp() const { return dp_clip > 0; }
  // What the live page shows of the run's settings (no paths of the operator's files).
  nlohmann::json Settings() const;
  absl::Status Validate() const;

 private:
  absl::Status ValidateRounds() const;
  absl::Status ValidateModel() const;
  absl::Status ValidatePrivacy() const;
  absl::Status ValidateSecureAggregation() const;
  absl::Status ValidateTransport() const;
};

// Every option as a flag and TOML key (the long flag name without --) of `app`.
void AddServerFlags(CLI::App& app, ServerOptions& o);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_SERVER_OPTIONS_H_
