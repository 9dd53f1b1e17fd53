// A new run, made at the first client's join: the ledger with the run's modules (those of the
// client's that --target-modules names), its id (from the seed and the base model), and either
// version 0 — the state every client starts from: A drawn from the seed and B = 0 (fedit,
// lora-fair), orthonormal B, A from the seed with R = 0 (fed-sb, fed_sb_init = random), nothing
// but the base (flora) — or, for a Fed-SB run initialised from the clients' gradient, the
// initialisation's settings (round 0 comes first: server/fed_sb_init.h).
#ifndef FEDLORA_SERVER_ROUND_RUN_SETUP_H_
#define FEDLORA_SERVER_ROUND_RUN_SETUP_H_

#include <memory>

#include "absl/status/statusor.h"
#include "common/tensor/adapter.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

// Saves the new run's ledger in `store`; returns Fed-SB's frozen B, A (R = 0) when version 0 has
// them, else an empty adapter. INVALID_ARGUMENT when the client's modules cannot make the run.
absl::StatusOr<std::shared_ptr<const common::Adapter>> CreateRun(
    const ServerOptions& options, const fedlora::v1::JoinRequest& first, StateStore& store);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ROUND_RUN_SETUP_H_
