#include "common/secagg/dp.h"

#include <openssl/rand.h>

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/base/strings.h"
#include "common/secagg/crypto.h"

namespace fedlora::secagg {
namespace {

using u128 = Uint128;

// Random bytes from OpenSSL, drawn 4 KiB at a time.
u128 RandomWord() {
  thread_local unsigned char buffer[4096];
  thread_local size_t left = 0;
  if (left < sizeof(u128)) {
    if (RAND_bytes(buffer, sizeof buffer) != 1) std::abort();  // no randomness: nothing is safe
    left = sizeof buffer;
  }
  u128 w;
  std::memcpy(&w, buffer + sizeof buffer - left, sizeof w);
  left -= sizeof w;
  return w;
}

// Uniform on {0, …, n−1}, n > 0, by rejection (no modulo bias).
u128 Uniform(u128 n) {
  const u128 limit = ~u128{0} - (~u128{0} % n + 1) % n;  // the largest multiple of n, minus 1
  for (;;) {
    const u128 r = RandomWord();
    if (r <= limit) return r % n;
  }
}

bool Bernoulli(u128 num, u128 den) { return Uniform(den) < num; }

// Uniform on [0, 1) with 53 random bits.
double UniformUnit() {
  return static_cast<double>(static_cast<uint64_t>(RandomWord() >> 75)) * 0x1p-53;
}

// Canonne, Kamath, Steinke 2020, Algorithm 2: the discrete Laplace of scale t.
int64_t DiscreteLaplace(uint64_t t) {
  for (;;) {
    const uint64_t u = static_cast<uint64_t>(Uniform(t));
    if (!BernoulliExp(u, t)) continue;
    uint64_t v = 0;
    while (BernoulliExp(1, 1)) ++v;
    const bool negative = Bernoulli(1, 2);
    if (negative && u == 0 && v == 0) continue;
    const int64_t x = static_cast<int64_t>(u + t * v);
    return negative ? -x : x;
  }
}

void WalshHadamard(std::vector<double>& v) {
  for (size_t h = 1; h < v.size(); h *= 2)
    for (size_t i = 0; i < v.size(); i += 2 * h)
      for (size_t j = i; j < i + h; ++j) {
        const double a = v[j], b = v[j + h];
        v[j] = a + b;
        v[j + h] = a - b;
      }
}

absl::Status ApplySigns(std::vector<double>& v, std::string_view seed) {
  std::vector<uint64_t> bits(v.size());
  if (absl::Status st = ExpandSeed(seed, 1, bits); !st.ok()) return st;
  for (size_t i = 0; i < v.size(); ++i)
    if (bits[i]) v[i] = -v[i];
  return absl::OkStatus();
}

}  // namespace

size_t RotatedLength(size_t d) {
  size_t n = 1;
  while (n < d) n *= 2;
  return n;
}

absl::StatusOr<std::vector<double>> Rotate(std::span<const double> x, std::string_view seed) {
  std::vector<double> v(RotatedLength(x.size()), 0.0);
  std::copy(x.begin(), x.end(), v.begin());
  if (absl::Status st = ApplySigns(v, seed); !st.ok()) return st;
  WalshHadamard(v);
  const double scale = 1 / std::sqrt(static_cast<double>(v.size()));
  for (double& e : v) e *= scale;
  return v;
}

absl::StatusOr<std::vector<double>> Unrotate(std::span<const double> y, std::string_view seed,
                                             size_t d) {
  if (y.empty() || RotatedLength(y.size()) != y.size() || d > y.size())
    return absl::InvalidArgumentError(common::StrCat("a rotated vector of ", y.size(),
                                                     " coordinates for ", d,
                                                     "; expected a power of two at least as long"));
  std::vector<double> v(y.begin(), y.end());
  WalshHadamard(v);
  const double scale = 1 / std::sqrt(static_cast<double>(v.size()));
  for (double& e : v) e *= scale;
  if (absl::Status st = ApplySigns(v, seed); !st.ok()) return st;
  v.resize(d);
  return v;
}

absl::StatusOr<std::vector<int64_t>> StochasticRound(std::span<const double> x, double scale) {
  std::vector<int64_t> out(x.size());
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i] * scale;
    if (!std::isfinite(v) || std::abs(v) >= 0x1p62)
      return absl::InvalidArgumentError(common::StrCat("coordinate ", i, " is ", x[i], " at scale ",
                                                       scale, "; expected |x·scale| < 2^62"));
    const double low = std::floor(v);
    out[i] = static_cast<int64_t>(low) + (UniformUnit() < v - low ? 1 : 0);
  }
  return out;
}

// Canonne, Kamath, Steinke 2020, Algorithm 1: Bernoulli(exp(−γ)) for γ = num/den ≥ 0.
bool BernoulliExp(u128 num, u128 den) {
  if (num > den) {  // exp(−γ) = exp(−1)^⌊γ⌋ · exp(−(γ − ⌊γ⌋))
    for (u128 i = num / den; i > 0; --i)
      if (!BernoulliExp(1, 1)) return false;
    return BernoulliExp(num % den, den);
  }
  u128 k = 1;
  while (Bernoulli(num, den * k)) ++k;
  return k % 2 == 1;
}

// Canonne, Kamath, Steinke 2020, Algorithm 3. With σ² = num/den and t = ⌊σ⌋ + 1, a discrete
// Laplace Y is kept with probability exp(−(|Y| − σ²/t)² / (2σ²)) = exp(−(|Y|·den·t − num)² /
// (2·num·den·t²)), all in 128-bit integers.
absl::StatusOr<int64_t> DiscreteGaussian(uint64_t num, uint64_t den) {
  if (den == 0 || den > (1u << 16) || num == 0 || num / den > (uint64_t{1} << 40))
    return absl::InvalidArgumentError(
        common::StrCat("sigma^2 = ", num, "/", den,
                       "; expected a denominator of 1 to 2^16 and 0 < sigma^2 <= 2^40"));
  const uint64_t t =
      static_cast<uint64_t>(std::floor(std::sqrt(static_cast<double>(num) / den))) + 1;
  const u128 denominator = u128{2} * num * den * t * t;
  for (;;) {
    const int64_t y = DiscreteLaplace(t);
    const u128 a = u128(static_cast<uint64_t>(y < 0 ? -y : y)) * den * t;
    const u128 diff = a > num ? a - num : num - a;
    // Beyond 2^63 the acceptance probability is below exp(−2^60): such a Y is never kept.
    if (diff >> 63) continue;
    if (BernoulliExp(diff * diff, denominator)) return y;
  }
}

}  // namespace fedlora::secagg
