// The clients' side of distributed DP under secure aggregation (ALGORITHMS.md, "Secure aggregation
// and distributed DP"; Kairouz, Liu, Steinke 2021): a randomised Walsh–Hadamard rotation that
// spreads a vector's mass over its coordinates, and the exact discrete Gaussian sampler of Canonne,
// Kamath, Steinke 2020 on OpenSSL's random bytes.
#ifndef FEDLORA_COMMON_SECAGG_DP_H_
#define FEDLORA_COMMON_SECAGG_DP_H_

#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::secagg {

__extension__ typedef unsigned __int128 Uint128;  // GCC's and Clang's, for exact rationals

// The length a vector of `d` coordinates is rotated at: the next power of two.
size_t RotatedLength(size_t d);

// x (padded with zeros to RotatedLength) ↦ H·D·x / √D: D the diagonal of ±1 signs that `seed`
// (32 bytes, ExpandSeed) gives, H the Walsh–Hadamard matrix. Orthogonal: norms are kept.
absl::StatusOr<std::vector<double>> Rotate(std::span<const double> x, std::string_view seed);
// The inverse: the first `d` coordinates of D·H·y / √D.
absl::StatusOr<std::vector<double>> Unrotate(std::span<const double> y, std::string_view seed,
                                             size_t d);

// x·scale rounded stochastically to integers: ⌊x·scale⌋, plus 1 with probability the fraction
// (OpenSSL's random bytes), so each is unbiased, within 1 of x·scale, and the expected squared
// error of the whole vector is at most d/4. INVALID_ARGUMENT when a value is not finite or its
// scaled magnitude reaches 2^62.
absl::StatusOr<std::vector<int64_t>> StochasticRound(std::span<const double> x, double scale);

// Exact samplers on OpenSSL's random bytes; rationals as numerator/denominator (denominator > 0).
// Bernoulli(exp(−num/den)).
bool BernoulliExp(Uint128 num, Uint128 den);
// The discrete Gaussian N_Z(0, σ²) with σ² = num/den: P(X = k) ∝ exp(−k²/(2σ²)) on the integers.
// σ² must be in (0, 2^40].
absl::StatusOr<int64_t> DiscreteGaussian(uint64_t num, uint64_t den);

}  // namespace fedlora::secagg

#endif  // FEDLORA_COMMON_SECAGG_DP_H_
