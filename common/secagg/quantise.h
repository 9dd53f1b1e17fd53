// A client's update as secure aggregation sums it, and the sum back (ALGORITHMS.md, "Secure
// aggregation and distributed DP"; the plan's numbers are in v1::SecAggConfig, made by
// PlanQuantisation): the client clips its values (flat L2) to `clip`, rotates them (randomised
// Walsh–Hadamard, `rotation_seed`), multiplies by `scale`, rounds stochastically, clamps each to
// ±`clamp`, adds discrete Gaussian noise of variance noise_num/noise_den when private, and reduces
// mod 2^bits; the coordinator reads the sum's words as signed integers, divides by the scale and
// rotates back. Without noise the decoded sum of n clients is within n·√rotated/scale (L2) of the
// sum of their clipped values (each rounding moves a coordinate by less than 1), unless a clamp
// bit, which happens with probability below 2^−40 per coordinate.
#ifndef FEDLORA_COMMON_SECAGG_QUANTISE_H_
#define FEDLORA_COMMON_SECAGG_QUANTISE_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/secagg/params.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::secagg {

struct Encoded {
  std::vector<uint64_t> words;  // RotatedLength(length) words below 2^bits
  double norm = 0;              // of the values before clipping
  int clamped = 0;              // coordinates the clamp cut (a 2^−40 event each)
};

// Writes `q`'s plan (length, clip, scale, clamp, noise, bits) into `config`.
void SetQuantisation(const Quantisation& q, v1::SecAggConfig& config);

// INVALID_ARGUMENT when `x` does not have the config's length or holds a value that is not finite.
absl::StatusOr<Encoded> Encode(std::span<const double> x, const v1::SecAggConfig& config);
// The first `length` values of the sum; INVALID_ARGUMENT for a sum of the wrong length.
absl::StatusOr<std::vector<double>> Decode(std::span<const uint64_t> sum,
                                           const v1::SecAggConfig& config);

// `words`, each below 2^bits, packed little-endian `bits` bits apiece (the masked input's bytes),
// and back: INVALID_ARGUMENT unless `bytes` is exactly PackedBytes(count, bits) long.
size_t PackedBytes(size_t count, int bits);
std::string PackWords(std::span<const uint64_t> words, int bits);
absl::StatusOr<std::vector<uint64_t>> UnpackWords(std::string_view bytes, int bits, size_t count);

}  // namespace fedlora::secagg

#endif  // FEDLORA_COMMON_SECAGG_QUANTISE_H_
