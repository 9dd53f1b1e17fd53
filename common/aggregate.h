// The four aggregation methods of ALGORITHMS.md, module by module, with each client's scaling
// folded into its B (B_k ← s_k·B_k, or R_k ← s_k·R_k for Fed-SB) so every output has scaling 1:
//   fedit     Ā = Σ p_k A_k, B̄ = Σ p_k B_k; mixed ranks zero-padded to r_max.
//   flora     A = [p_1 A_1; …; p_K A_K], B = [B_1 | … | B_K]: B·A = ΔW* = Σ p_k B_k A_k exactly,
//   rank Σ r_k. lora-fair (Ā, B̄ + ΔB*) with ΔB* from SolveLoraFair (lora_fair.h). fed-sb    R = Σ
//   p_k R_k on the shared frozen B, A; needs equal ranks and identical B, A.
// Nothing of size m×n is formed: every norm and inner product goes through r×r Gram matrices.
#ifndef FEDLORA_COMMON_AGGREGATE_H_
#define FEDLORA_COMMON_AGGREGATE_H_

#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/adapter.h"
#include "common/lora_fair.h"

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
  double relative_error =
      0;  // ‖ΔW_out − ΔW*‖_F / ‖ΔW*‖_F (0 when both are 0); FedIT's aggregation error.
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

// Aggregates `clients` with weights p_k (normalised, see NormalizeWeights). The output's module
// order is the first client's; its base_model is the first client's.
absl::StatusOr<AggregateResult> Aggregate(std::span<const Adapter> clients,
                                          std::span<const double> weights,
                                          const AggregateOptions& options);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_AGGREGATE_H_
