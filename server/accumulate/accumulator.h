// What a round does with its accepted updates. An accumulator is chosen when the round opens
// (server/round/lifecycle.cc: weighted sums, every client's factors, the median norm bound around
// either, client-level DP, a Fed-SB initialisation step) and asked for the round's result when it
// closes: a close reads "accumulator → aggregate → commit" (server/round/close.h), and another
// round protocol is another implementation, not branches in the engine.
//
// Reproducible to the bit: an accumulator folds the accepted updates in client-id order, whatever
// order they arrived in, reading each back from the state store where the update gate left it —
// so the same accepted updates always give the same bytes, after a restart too, and memory holds a
// window of decoded updates rather than the cohort's (FoldInOrder). Aggregate may run again after
// a failed commit.
#ifndef FEDLORA_SERVER_ACCUMULATE_ACCUMULATOR_H_
#define FEDLORA_SERVER_ACCUMULATE_ACCUMULATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/parallel.h"
#include "common/run/ledger.h"
#include "common/tensor/adapter.h"
#include "common/tensor/linalg.h"

namespace fedlora::server {

// An update the gate accepted.
struct AcceptedUpdate {
  std::string client;
  std::string sha256;  // its blob in the state store
  int64_t weight = 0;  // its aggregation weight: the examples it claims, within the round's cap
  double norm = 0;     // its ‖s·B·A‖_F flat over the modules (0 for a sketch step's answer)
};

// Decodes accepted updates back from the store (the update gate's decoding, server/intake/).
class UpdateSource {
 public:
  virtual ~UpdateSource() = default;
  // The decoded update, in `reuse`'s memory where it is large enough (Adapter::Create).
  virtual absl::StatusOr<common::Adapter> Update(const AcceptedUpdate& update,
                                                 common::Adapter reuse) const = 0;
  // A Fed-SB initialisation step's answer: one product per module.
  virtual absl::StatusOr<std::vector<common::MatrixD>> Products(
      const AcceptedUpdate& update) const = 0;
};

// A round's result.
struct RoundOutput {
  common::Adapter adapter;  // a round's new global adapter (flora: the round's delta), scaling 1
  // A Fed-SB initialisation step: Σ weight·product per module, and Σ weight (under client-level
  // DP the noised mean, weight 1).
  std::vector<common::MatrixD> sums;
  double weight = 0;
  std::vector<std::string> aggregated;   // whose updates it holds, sorted
  common::PerClientValue norm_outliers;  // left out by --max-update-norm-ratio, with their norms
  std::optional<common::ClientDpSpend> client_dp;              // what a private release spent
  std::optional<common::ClientDpState> dp_state;               // the privacy state with it entered
  std::optional<double> lora_fair_objective, fedit_objective;  // lora-fair, over the modules
  std::optional<common::SecAggRecord> secure_aggregation;      // its instance, when secure
  std::optional<common::SecAggRecord> secure_correction;       // lora-fair's second instance
};

class Accumulator {
 public:
  virtual ~Accumulator() = default;
  // The round's result from `updates` (sorted by client: the order they are folded in).
  virtual absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                                const UpdateSource& source) = 0;
};

// The clients of `updates`, in their order.
std::vector<std::string> ClientsOf(const std::vector<AcceptedUpdate>& updates);

// Calls fold(update, decoded) for each of `updates` in order, decoding a few at a time on every
// core (at most 8) with `load` while memory holds only those. `load` is handed what the fold left
// of an earlier update (a default T at first) to decode into: the window's memory is allocated
// once, not once per update (at Llama-7B shapes, fresh pages were 80% of a FedIT close).
template <typename T>
absl::Status FoldInOrder(const std::vector<AcceptedUpdate>& updates,
                         const std::function<absl::StatusOr<T>(const AcceptedUpdate&, T)>& load,
                         const std::function<absl::Status(const AcceptedUpdate&, T&)>& fold) {
  const size_t window = std::min(8u, 2 * std::max(1u, std::thread::hardware_concurrency()));
  std::vector<absl::StatusOr<T>> decoded(window);
  std::vector<T> spare(window);
  for (size_t first = 0; first < updates.size(); first += window) {
    const size_t n = std::min(window, updates.size() - first);
    common::ParallelFor(
        n, [&](size_t i) { decoded[i] = load(updates[first + i], std::move(spare[i])); });
    for (size_t i = 0; i < n; ++i) {
      if (!decoded[i].ok()) return decoded[i].status();
      if (absl::Status st = fold(updates[first + i], *decoded[i]); !st.ok()) return st;
      spare[i] = *std::move(decoded[i]);
    }
  }
  return absl::OkStatus();
}

// FoldInOrder over `source`'s decoded updates, and over a Fed-SB step's products.
inline absl::Status FoldUpdates(
    const std::vector<AcceptedUpdate>& updates, const UpdateSource& source,
    const std::function<absl::Status(const AcceptedUpdate&, common::Adapter&)>& fold) {
  return FoldInOrder<common::Adapter>(
      updates,
      [&](const AcceptedUpdate& u, common::Adapter reuse) {
        return source.Update(u, std::move(reuse));
      },
      fold);
}
inline absl::Status FoldProducts(
    const std::vector<AcceptedUpdate>& updates, const UpdateSource& source,
    const std::function<absl::Status(const AcceptedUpdate&, std::vector<common::MatrixD>&)>& fold) {
  return FoldInOrder<std::vector<common::MatrixD>>(
      updates,
      [&](const AcceptedUpdate& u, std::vector<common::MatrixD>) { return source.Products(u); },
      fold);
}

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ACCUMULATE_ACCUMULATOR_H_
