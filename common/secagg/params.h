// The parameters of a secure aggregation round (ALGORITHMS.md, "Secure aggregation and distributed
// DP"): who shares keys with whom and how many shares unmask (the graph), and how a client's update
// becomes integers mod 2^b that the sum cannot wrap (the quantisation).
//
// The graph is SecAgg+'s (Bell et al. 2020), as google-parfait/federated-compute's
// graph_parameter_finder chooses it: the cohort sits on a ring in a random order; each client's
// neighbours are the k/2 before and the k/2 after it (a Harary graph), and its seeds are shared
// among them and itself (k + 1 holders), any t of which unmask. k is the smallest even degree for
// which, with at most ⌊γn⌋ corrupt and ⌈δn⌉ dropped clients placed at random (so a ten-client
// cohort at δ = 5% plans for one drop, where fcp's rounding plans for none),
//   - security: some client has t or more corrupt holders with probability ≤ 2^−41, and the
//     honest survivors stay connected with probability ≥ 1 − 2^−41;
//   - semi-malicious coordinator: 2t > (k + 1) + (the corrupt holders' bound), so two sets of t
//     holders always share an honest one (with the consistency round, a coordinator cannot collect
//     a client's self-mask seed and its mask key both);
//   - correctness: some client keeps fewer than t surviving holders with probability ≤ 2^−20.
// A cohort too small for any k < n − 1 uses the complete graph (SecAgg, Bonawitz et al. 2017),
// with t = ⌊(n + ⌊γn⌋)/2⌋ + 1 (at least 2): it then survives n − t dropped clients.
#ifndef FEDLORA_COMMON_SECAGG_PARAMS_H_
#define FEDLORA_COMMON_SECAGG_PARAMS_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::secagg {

struct GraphParams {
  int clients = 0;     // n, the cohort
  int neighbours = 0;  // k: each client's neighbours, itself not counted (n − 1: complete graph)
  int threshold = 0;   // t: shares (of k + 1) that unmask one client
  bool complete() const { return neighbours == clients - 1; }
  // The dropped holders one client can lose and still be unmasked: k + 1 − t.
  int tolerated() const { return neighbours + 1 - threshold; }
};

// The graph for a cohort of n ≥ 3 clients (fewer make no sense: with two, each learns the other's
// update from the sum) with dropout rate δ and corrupt rate γ in [0, 1). INVALID_ARGUMENT, saying
// why, for rates outside it or with γ + 2δ > 0.9 (fcp's feasibility rule for a semi-malicious
// coordinator).
absl::StatusOr<GraphParams> ChooseGraph(int clients, double dropout, double corrupt);

// The positions of a ring of n clients drawn from `seed` (32 bytes; a permutation of 0..n−1 by
// Fisher–Yates on ExpandSeed's words), and the neighbours of the client at index `client` (its
// k/2 predecessors and k/2 successors on the ring), ascending.
absl::StatusOr<std::vector<int>> RingOrder(int clients, std::string_view seed);
std::vector<int> Neighbours(const GraphParams& graph, const std::vector<int>& ring_position,
                            int client);

// How a client's update of `length` values (flat L2 norm ≤ clip after clipping) becomes integers:
// rotated (to `rotated` = RotatedLength(length) values), multiplied by `scale`, rounded
// stochastically, clamped to ±`clamp`, noised with N_Z(0, noise_num/noise_den) when private, and
// reduced mod 2^bits. Summing at most `summands` of them cannot wrap: summands·clamp plus the
// noise's 2^−40 tail stays below 2^(bits−1).
struct Quantisation {
  size_t length = 0, rotated = 0;
  double clip = 0, scale = 0;
  int64_t clamp = 0;
  uint64_t noise_num = 0, noise_den = 1;  // a client's noise variance, in integer units; 0: none
  int summands = 0;
  int bits = 0;
  double local_sigma() const;  // √(noise_num/noise_den)
  // The bound on ‖what one client adds‖₂ in integer units (the accountant's sensitivity): its
  // clipped update scaled, plus √rotated for the rounding (ALGORITHMS.md).
  double l2_sensitivity() const;
  // What the plan is, for the log: "2048 values in 24 bits, scale 3.1e+06, …".
  std::string Describe() const;
};

// The plan for `length` values clipped to `clip` (> 0) summed over at most `summands` clients.
// `noise_multiplier` z (0: no noise) is the central noise's: the sum of `expected_clients` clients'
// noise has standard deviation z·clip, so each adds z·clip/√expected_clients. The scale keeps the
// rounding 2^16 times finer than a typical rotated coordinate (clip/√rotated) and, with noise, the
// local noise σ at most 2^20 integer units (the sampler's range). INVALID_ARGUMENT when the sum
// needs more than 62 bits.
absl::StatusOr<Quantisation> PlanQuantisation(size_t length, double clip, double noise_multiplier,
                                              double expected_clients, int summands);

}  // namespace fedlora::secagg

#endif  // FEDLORA_COMMON_SECAGG_PARAMS_H_
