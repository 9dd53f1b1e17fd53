// The four aggregation methods of ALGORITHMS.md, module by module, with each client's scaling
// folded into its B (B_k ← s_k·B_k, or R_k ← s_k·R_k for Fed-SB) so every output has scaling 1:
// clang-format off
//   fedit      Ā = Σ p_k A_k, B̄ = Σ p_k B_k; mixed ranks zero-padded to r_max.
//   flora      A = [p_1 A_1; …; p_K A_K], B = [B_1 | … | B_K]: B·A = ΔW* = Σ p_k B_k A_k exactly,
//              rank Σ r_k.
//   lora-fair  (Ā, B̄ + ΔB*) with ΔB* from SolveLoraFair (lora_fair.h).
//   fed-sb     R = Σ p_k R_k on the shared frozen B, A; needs equal ranks and identical B, A.
// clang-format on
// Nothing of size m×n is formed: every norm and inner product goes through r×r Gram matrices.
#ifndef FEDLORA_COMMON_AGGREGATION_AGGREGATE_H_
#define FEDLORA_COMMON_AGGREGATION_AGGREGATE_H_

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/lora_fair.h"
#include "common/tensor/adapter.h"

namespace fedlora::common {

enum class Method { kFedIt, kFlora, kLoraFair, kFedSb };

inline constexpr Method kAllMethods[] = {Method::kFedIt, Method::kFlora, Method::kLoraFair,
                                         Method::kFedSb};
std::string_view MethodName(Method method);  // "fedit", "flora", "lora-fair", "fed-sb"
absl::StatusOr<Method> ParseMethod(std::string_view name);

struct AggregateOptions {
  Method method = Method::kFedIt;
  LoraFairOptions lora_fair;  // Used by lora-fair only.
};

struct ModuleReport {
  std::string name;
  int rank = 0;            // Rank of the aggregated module.
  double target_norm = 0;  // ‖ΔW*‖_F, the ideal aggregate's norm.
  // ‖ΔW_out − ΔW*‖_F / ‖ΔW*‖_F (0 when both are 0); FedIT's aggregation error.
  double relative_error = 0;
  LoraFairSolution lora_fair;  // lora-fair only (its `b` is cleared to save memory).
};

struct AggregateResult {
  Adapter adapter;                    // Scaling 1 everywhere; has_r modules for fed-sb.
  std::vector<ModuleReport> modules;  // In the adapter's module order.
};

// Normalises non-negative weights to sum 1; uniform when `weights` is empty. `count` is the number
// of clients.
absl::StatusOr<std::vector<double>> NormalizeWeights(std::span<const double> weights, size_t count);

// OK when `clients` can be aggregated with `method`: the same module names with the same n and m
// everywhere, finite values, plain LoRA modules for fedit/flora/lora-fair, and for fed-sb LoRA-SB
// modules of equal rank with identical frozen B and A. Otherwise an INVALID_ARGUMENT that names the
// client, module and both shapes.
absl::Status CheckCompatible(std::span<const Adapter> clients, Method method);

// OK when `update` adapts exactly the modules of `expected` — same names, rank, n and m, and
// lora_R exactly where `expected` has it — with finite values. Otherwise INVALID_ARGUMENT naming
// the module and both shapes ("module q_proj: lora_A has shape [8,576], task says [16,576]"), or
// the module missing or not asked for. The
// coordinator checks every update against its task with it. With `scaling` > 0 each module's
// scaling must be that (the task's lora_alpha / r): a client cannot scale its own weight.
absl::Status CheckShapes(const Adapter& update, std::span<const ModuleShape> expected,
                         std::string_view origin, double scaling = 0);

// FedIT's and Fed-SB's weighted sums for one module (ALGORITHMS.md): a += w·A, b += w·s·B (fedit
// and lora-fair's Ā, B̄; an update of lower rank fills the leading rows of a and columns of b), or
// r += w·s·R (fed-sb). `a`, `b` (or `r`) must be sized to the output rank. Aggregate folds all
// clients through it at once; the coordinator's StreamingAverage folds each update as it arrives.
void AddToSums(Method method, const Adapter& update, size_t j, double weight, MatrixD* a,
               MatrixD* b, MatrixD* r);

// FLoRA's stacking of module `index[k]` of each client (ALGORITHMS.md): a = [p_1 A_1; …; p_K A_K]
// (R×n), b = [s_1 B_1 | … | s_K B_K] (m×R, s_k B_k R_k for LoRA-SB modules), so that b·a =
// Σ p_k s_k B_k A_k exactly with R = Σ r_k.
void StackModule(std::span<const Adapter> clients, std::span<const size_t> index,
                 std::span<const double> p, MatrixD* b, MatrixD* a);

// Every module of `clients` (same module order and shapes but for the rank) stacked with weights
// p (not normalised), scaling 1: the coordinator's FLoRA export sums its rounds' deltas with
// p = 1.
absl::StatusOr<Adapter> StackAdapters(std::span<const Adapter> clients, std::span<const double> p);

// The weighted mean of updates folded in one at a time, so memory does not grow with their number:
// FedIT's Ā = Σ w_k A_k / Σ w_k, B̄ = Σ w_k s_k B_k / Σ w_k, or Fed-SB's R̄ on the frozen B, A.
// Sums are kept in double. Add folds modules on every core when the update is large.
class StreamingAverage {
 public:
  StreamingAverage() = default;
  // `shapes` are the output's modules (the run's rank); for fed-sb, `frozen` holds the shared
  // B and A, which the mean carries.
  StreamingAverage(Method method, std::vector<ModuleShape> shapes, const Adapter* frozen);

  // Folds `update`, whose modules were checked against the shapes (CheckShapes); weight > 0.
  void Add(const Adapter& update, double weight);
  double total_weight() const { return weight_; }
  // The mean (scaling 1); FAILED_PRECONDITION before the first Add.
  absl::StatusOr<Adapter> Mean() const;

 private:
  Method method_ = Method::kFedIt;
  std::vector<ModuleShape> shapes_;
  Adapter frozen_;
  std::vector<MatrixD> a_, b_, r_;  // per module: r×n, m×r, r×r
  double weight_ = 0;
};

// Aggregates `clients` with weights p_k (normalised, see NormalizeWeights). The output's module
// order is the first client's; its base_model is the first client's. A result that would hold a
// non-finite value is refused.
absl::StatusOr<AggregateResult> Aggregate(std::span<const Adapter> clients,
                                          std::span<const double> weights,
                                          const AggregateOptions& options);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_AGGREGATION_AGGREGATE_H_
