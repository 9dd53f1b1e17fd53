// The run's result, written to <state-dir>/export for the ledger's latest version — at the end of
// the run and on demand (SIGUSR1) — each directory replaced atomically, version.json last:
//   global/               the global adapter as PEFT: Ā, B̄ (fedit, lora-fair), the frozen B, A
//                         with R̄ (fed-sb), or every round's stacked delta, rank Σ R_t (flora)
//   global-lora/          fed-sb: B·R folded into plain LoRA
//   global-rank<r>/       flora: the truncated SVD of the summed deltas at the run's rank, with
//   retained_energy.json  the energy it keeps per module
//   merged/               with a base model: the base with the result folded in
//   gguf/                 with a base model and --export-gguf: model.gguf (merged/ for llama.cpp)
//                         and adapter.gguf (the global adapter as a llama.cpp LoRA adapter)
//   version.json          which version the export holds
// Everything derives from a committed ledger (a snapshot: the follow-up's thread exports while
// rounds go on) and its blobs, so an export can always be redone.
#ifndef FEDLORA_SERVER_EXPORTER_H_
#define FEDLORA_SERVER_EXPORTER_H_

#include "absl/status/status.h"
#include "common/tensor/adapter.h"
#include "server/evaluator.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

// The global adapter of `version` (fed-sb: `frozen`'s B, A with that version's R; flora: that
// round's delta). The exports of flora hold every round's delta stacked instead.
absl::StatusOr<common::Adapter> AdapterAt(const Ledger& ledger, const StateStore& store,
                                          int64_t version, const common::Adapter& frozen);

// Exports the ledger's latest version. `evaluator` may be null (no base model: no merged/ export).
absl::Status Export(const Ledger& ledger, const StateStore& store, const ServerOptions& options,
                    const common::Adapter& frozen, Evaluator* evaluator);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_EXPORTER_H_
