#include "server/server_options.h"

#include "common/strings.h"

namespace fedlora::server {
using common::StrCat;

absl::Status ServerOptions::Validate() const {
  auto bad = [](auto... parts) { return absl::InvalidArgumentError(StrCat(parts...)); };
  if (!common::ParseMethod(method).ok()) return common::ParseMethod(method).status();
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
  if (!(learning_rate > 0)) return bad("learning_rate is ", learning_rate, "; it must be > 0");
  if (!eval_data.empty() && base_model_dir.empty())
    return bad("eval_data ", eval_data, " needs base_model_dir (the model to evaluate it with)");
  if (eval_max_length < 2) return bad("eval_max_length is ", eval_max_length, "; it must be >= 2");
  if (!(lora_fair_lambda >= 0))
    return bad("lora_fair_lambda is ", lora_fair_lambda, "; it must be >= 0");
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

common::Method ServerOptions::ParsedMethod() const { return *common::ParseMethod(method); }

}  // namespace fedlora::server
