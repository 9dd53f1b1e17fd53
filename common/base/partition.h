// The Dirichlet partitioner of non-IID federated data. Federated learning papers use a symmetric
// Dirichlet(α) in two different ways, and fedlora uses both; they are not interchangeable:
//
//   Per-client label proportions (PerClientLabelProportions): client k's mix over the L labels,
//     p_k = (p_k1, …, p_kL) ~ Dir_L(α), one draw per client; its records are then drawn label by
//     label from p_k. Every client has as many records as asked; only their mix varies.
//     `fedlora make-data` generates its synthetic clients this way.
//
//   Per-label client shares (SplitByLabelShares; Hsu, Qi & Brown 2019, "Measuring the Effects of
//     Non-Identical Data Distribution for Federated Visual Classification", §3): for each label c,
//     the K clients' shares of that label's records, q_c = (q_c1, …, q_cK) ~ Dir_K(α), one draw per
//     label; an existing pool is cut accordingly, so clients differ in size as well as in mix.
//     `fedlora experiment` splits its pool this way.
//
// In both, E[p_kc] = 1/L (E[q_ck] = 1/K) and Var = (1/n)(1 − 1/n)/(nα + 1) for n = L (n = K):
// α → ∞ gives every client (every label) equal parts, α → 0 gives each client one label (each
// label to one client).
#ifndef FEDLORA_COMMON_BASE_PARTITION_H_
#define FEDLORA_COMMON_BASE_PARTITION_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

// One draw of the symmetric Dirichlet(α, …, α) over n ≥ 1 coordinates: n Gamma(α, 1) draws,
// normalised to sum 1. When every Gamma draw underflows to 0 (α far below 0.01), all the mass goes
// to one coordinate drawn uniformly: the α → 0 limit.
std::vector<double> DirichletSample(int n, double alpha, std::mt19937_64& rng);

// Per-client label proportions: `clients` rows, row k client k's proportions over `labels` labels
// ~ Dir_labels(α), drawn one client after the other (one Gamma sampler across them all).
std::vector<std::vector<double>> PerClientLabelProportions(int clients, int labels, double alpha,
                                                           std::mt19937_64& rng);

// Per-label client shares, applied to items whose labels are `labels` (one per item): returns, per
// client, the indices of the items it holds. Labels are taken in sorted order; for each, its
// clients' shares ~ Dir_clients(α) are drawn, its items shuffled and cut at the cumulative shares
// (rounded to the nearest item; the last client takes the rest), so every item goes to exactly one
// client. The split is drawn again, up to 100 times, until every client holds at least
// `min_per_client` items; otherwise the error says so. Deterministic in `seed`.
absl::StatusOr<std::vector<std::vector<size_t>>> SplitByLabelShares(
    const std::vector<std::string>& labels, int clients, double alpha, size_t min_per_client,
    uint64_t seed);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_PARTITION_H_
