#include "client/client_options.h"

#include <set>

#include "common/base/strings.h"

namespace fedlora::client {

using common::StrCat;

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
  if (!admin.empty()) {
    static const std::set<std::string> kActions = {"remove", "pause", "resume", "export", "unpin"};
    if (!kActions.contains(admin))
      return bad("--admin ", admin, ": expected remove, pause, resume, export or unpin");
    if ((admin == "remove" || admin == "unpin") == admin_client.empty())
      return bad("--admin ", admin,
                 admin_client.empty() ? " needs --admin-client ID" : " takes no --admin-client");
    if (!admin_reason.empty() && admin != "remove")
      return bad("--admin-reason goes with --admin remove");
    if (insecure || cert.empty())
      return bad("--admin needs mutual TLS: an operator's --cert and --key (not --insecure)");
  }
  if (workload == WorkloadKind::kCommand && trains() &&
      (command.command.empty() || command.base_model_sha256.empty() || modules.empty())) {
    return bad("the command workload needs --train-command, --base-model-sha256 and --modules");
  }
  if (workload == WorkloadKind::kLlm && trains() && (llm.model_dir.empty() || llm.data.empty()))
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
  app.add_flag("--checkpoint-activations", o.llm.checkpoint_activations,
               "llm: keep only each layer's input, recompute its activations in the backward "
               "(less memory for long sequences, one more forward per step)");
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
  app.add_option(
      "--admin", o.admin,
      "as an operator (--operators): remove | pause | resume | export | unpin, and exit");
  app.add_option("--admin-client", o.admin_client, "the client --admin remove or unpin acts on");
  app.add_option("--admin-reason", o.admin_reason,
                 "why the client is removed (recorded, and told to it)");
}

}  // namespace fedlora::client
