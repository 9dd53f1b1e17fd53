#include "server/server_options.h"

#include "common/base/strings.h"

namespace fedlora::server {
using common::StrCat;

absl::Status ServerOptions::Validate() const {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(StrCat(parts...)); };
  if (rounds < 1) return bad("rounds is ", rounds, "; it must be at least 1");
  if (min_clients < 1) return bad("min_clients is ", min_clients, "; it must be at least 1");
  if (!(fraction > 0 && fraction <= 1))
    return bad("fraction is ", fraction, "; it must be in (0, 1]");
  if (!(quorum > 0 && quorum <= 1)) return bad("quorum is ", quorum, "; it must be in (0, 1]");
  if (min_cohort < 1) return bad("min_cohort is ", min_cohort, "; it must be at least 1");
  if (!(round_deadline_s > 0))
    return bad("round_deadline_s is ", round_deadline_s, "; it must be > 0");
  if (!(client_timeout_s > 0))
    return bad("client_timeout_s is ", client_timeout_s, "; it must be > 0");
  if (rank < 1) return bad("rank is ", rank, "; it must be at least 1");
  if (local_steps < 1) return bad("local_steps is ", local_steps, "; it must be at least 1");
  if (!(max_update_norm >= 0))
    return bad("max_update_norm is ", max_update_norm, "; it must be >= 0 (0: off)");
  if (max_client_examples < 1)
    return bad("max_client_examples is ", max_client_examples, "; it must be at least 1");
  if (!(learning_rate > 0)) return bad("learning_rate is ", learning_rate, "; it must be > 0");
  if (!eval_data.empty() && base_model_dir.empty())
    return bad("eval_data ", eval_data, " needs base_model_dir (the model to evaluate it with)");
  if (eval_max_length < 2) return bad("eval_max_length is ", eval_max_length, "; it must be >= 2");
  if (!(lora_fair_lambda >= 0))
    return bad("lora_fair_lambda is ", lora_fair_lambda, "; it must be >= 0");
  if (fed_sb_init != "sketch" && fed_sb_init != "dense" && fed_sb_init != "random")
    return bad("fed_sb_init is '", fed_sb_init, "'; it must be sketch, dense or random");
  if (fed_sb_oversampling < 0 || fed_sb_power_iterations < 0 || fed_sb_init_examples < 1 ||
      !(fed_sb_init_lr > 0)) {
    return bad(
        "fed-sb initialisation needs oversampling >= 0, power iterations >= 0, examples >= 1 "
        "and a learning rate > 0; got ",
        fed_sb_oversampling, ", ", fed_sb_power_iterations, ", ", fed_sb_init_examples, " and ",
        fed_sb_init_lr);
  }
  if (!(dp_clip >= 0)) return bad("dp_clip is ", dp_clip, "; it must be >= 0 (0: off)");
  if (!(dp_noise_multiplier >= 0))
    return bad("dp_noise_multiplier is ", dp_noise_multiplier, "; it must be >= 0");
  if (!(dp_init_noise_multiplier >= 0 || dp_init_noise_multiplier == -1))
    return bad("dp_init_noise_multiplier is ", dp_init_noise_multiplier,
               "; it must be >= 0, or -1 for dp_noise_multiplier's");
  if (!client_dp() && (dp_noise_multiplier > 0 || dp_adaptive_clip || dp_target_epsilon > 0 ||
                       dp_init_noise_multiplier >= 0)) {
    return bad(
        "client-level DP needs dp_clip > 0 (the bound on each client's update, the initial one "
        "with dp_adaptive_clip)");
  }
  if (client_dp() && method == common::Method::kFlora) {
    return bad(
        "flora cannot run with client-level DP: the coordinator needs each client's own factors "
        "to stack them, so no sum can be noised. Use DP-SGD on the clients instead "
        "(fedlora-client --dp-noise-multiplier, --dp-clip)");
  }
  if (!(dp_delta > 0 && dp_delta < 1))
    return bad("dp_delta is ", dp_delta, "; it must be in (0, 1)");
  if (!(dp_target_epsilon >= 0))
    return bad("dp_target_epsilon is ", dp_target_epsilon, "; it must be >= 0 (0: none)");
  if (dp_target_epsilon > 0 && dp_noise_multiplier == 0) {
    return bad("dp_target_epsilon needs dp_noise_multiplier > 0: without noise ε is infinite");
  }
  if (!(dp_target_quantile >= 0 && dp_target_quantile <= 1))
    return bad("dp_target_quantile is ", dp_target_quantile, "; it must be in [0, 1]");
  if (!(dp_clip_learning_rate >= 0))
    return bad("dp_clip_learning_rate is ", dp_clip_learning_rate, "; it must be >= 0");
  if (dp_adaptive_clip && dp_noise_multiplier > 0 && dp_count_stddev >= 0 &&
      dp_noise_multiplier >= 2 * dp_count_stddev) {
    return bad("dp_noise_multiplier ", dp_noise_multiplier,
               " must be below 2*dp_count_stddev = ", 2 * dp_count_stddev,
               ": the noised count of unclipped updates takes its share of the round's budget");
  }
  if (!(give_up_after_s > 0))
    return bad("give_up_after_s is ", give_up_after_s, "; it must be > 0");
  if (chunk_bytes < 1024 || chunk_bytes > (64 << 20))
    return bad("chunk_bytes is ", chunk_bytes, "; use 1 KiB to 64 MiB");
  if (!insecure && (tls_cert.empty() || tls_key.empty())) {
    return bad(
        "TLS needs tls_cert and tls_key (PEM files); deploy/make_certs.sh makes a CA and "
        "certificates. "
        "Only for experiments on one machine: --insecure");
  }
  if (insecure && !client_ca.empty())
    return bad("client_ca (mutual TLS) cannot be combined with insecure");
  if (!allowed_clients.empty() && client_ca.empty()) {
    return bad(
        "allowed_clients needs client_ca: without mutual TLS there are no client identities to "
        "check");
  }
  return absl::OkStatus();
}

}  // namespace fedlora::server
