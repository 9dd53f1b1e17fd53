// Shamir's t-of-n secret sharing (Shamir 1979) over the prime field of p = 2^521 − 1, for the
// seeds and keys of secure aggregation (ALGORITHMS.md, "Secure aggregation"): any `threshold`
// shares give the secret back; fewer give nothing about it. Arithmetic on OpenSSL's BIGNUM;
// coefficients from its random generator.
#ifndef FEDLORA_COMMON_SECAGG_SHAMIR_H_
#define FEDLORA_COMMON_SECAGG_SHAMIR_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::secagg {

struct Share {
  uint32_t x = 0;  // the point, 1..n (the holder's index)
  std::string y;   // the polynomial's value there: kShareBytes, big-endian
};

// A share's value: ⌈521 / 8⌉ bytes.
inline constexpr size_t kShareBytes = 66;

// Largest secret that can be shared: p has 521 bits.
inline constexpr size_t kMaxSecretBytes = 64;

// `count` shares of `secret` (up to kMaxSecretBytes), any `threshold` of which reconstruct it;
// 1 <= threshold <= count <= 65535.
absl::StatusOr<std::vector<Share>> ShamirSplit(std::string_view secret, int threshold, int count);
// Shares at the given distinct `points` (1..65535) only.
absl::StatusOr<std::vector<Share>> ShamirSplit(std::string_view secret, int threshold,
                                               std::span<const uint32_t> points);

// The secret of `secret_size` bytes from at least `threshold` shares with distinct points (the
// first `threshold` are used). INVALID_ARGUMENT with fewer, repeated points or malformed shares;
// DATA_LOSS when the shares do not interpolate to a secret of that size (shares of different
// secrets, or altered).
absl::StatusOr<std::string> ShamirCombine(std::span<const Share> shares, int threshold,
                                          size_t secret_size);

}  // namespace fedlora::secagg

#endif  // FEDLORA_COMMON_SECAGG_SHAMIR_H_
