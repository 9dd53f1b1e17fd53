// Fed-SB's initialisation on the coordinator (LoRA-SB: the frozen B, A and the starting R0 from the
// top-r singular subspace of the clients' summed loss gradient G = Σ p_k G_k; ../shared/
// ALGORITHMS.md). It runs before round 1 as steps with the cohort, quorum, deadline and retry rules
// of rounds (server/round_engine.h): every step, each cohort member uploads a product of its G_k
// (common/aggregation/sketch.h), the coordinator sums them weighted by examples, and the step's
// close is one transaction like a round's — write the step's blob, then save the ledger:
//   - a step before the last leaves the orthonormal basis of the summed product for the next step
//     (a basis blob, recorded in the ledger's fed_sb_init.steps);
//   - the last step makes version 0: with the sketch, from the projection Z = Qᵀ·G, G ≈ U·Σ·Vᵀ,
//     B = U_r, A = V_rᵀ and R0 = −η·√(mn)/‖Z‖_F·Σ_r (a first step −η·G/rms(G) whose entries have
//     the size of −η·sign(G)'s; sign() is not linear, so no sketch can apply it); dense, from the
//     summed G itself, ΔW = −η·sign(G) truncated by SVD as the trainer's LoRA-SB does.
// A restarted coordinator continues at the first step not committed; a client that joins later
// downloads version 0 like any state.
#ifndef FEDLORA_SERVER_FED_SB_INIT_H_
#define FEDLORA_SERVER_FED_SB_INIT_H_

#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/sketch.h"
#include "common/run/ledger.h"
#include "common/tensor/adapter.h"
#include "common/tensor/blob.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/accumulate/accumulator.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

// A new run's initialisation settings, from the options (none for fed_sb_init = random).
std::optional<FedSbInit> NewFedSbInit(const ServerOptions& options);

// Step `step` of the run's initialisation: what it asks for, and the shapes of the products
// clients upload, per module of the ledger.
common::SketchStep InitStepKind(const FedSbInit& init, int step);
std::vector<common::MatrixShape> InitProductShapes(const Ledger& ledger, int step);

// The task a cohort member gets for the current step (the basis blob in its downloads).
void FillSketchTask(const Ledger& ledger, v1::Task* task);

// Commits the current step from its accumulator's output (the summed products Σ n_k·X_k over the
// contributors and Σ n_k, or under client-level DP their noised mean and the privacy state with
// the step entered) as described above; `record` says who contributed what. Returns Fed-SB's
// frozen adapter (B, A and R0) once the last step has made version 0, and an empty one before.
absl::StatusOr<common::Adapter> CommitInitStep(StateStore& store, int rank,
                                               const RoundOutput& output,
                                               common::InitStepRecord record);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_FED_SB_INIT_H_
