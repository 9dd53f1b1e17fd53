// Differential-privacy building blocks: Gaussian noise from a cryptographically keyed stream, flat
// L2 clipping across tensors, and adaptive clipping (Andrew et al. 2021, as in TF-Privacy;
// ALGORITHMS.md).
#ifndef FEDLORA_COMMON_PRIVACY_DP_H_
#define FEDLORA_COMMON_PRIVACY_DP_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <memory>
#include <span>

#include "absl/status/statusor.h"

namespace fedlora::common {

// N(0, σ²) samples from an AES-256-CTR keystream. Secure() keys it from OpenSSL's RAND_bytes, so no
// two generators share a stream and nothing about it can be predicted; ForTestingOnly() keys it
// from a seed so a test can repeat a draw, and must never be used for real noise. Each sample is (Σ
// of 4 Box–Muller normals)/2, as Opacus' secure mode does, to blunt floating-point attacks on the
// sampler (Holohan & Braghin 2021).
class GaussianNoise {
 public:
  static absl::StatusOr<GaussianNoise> Secure();
  static GaussianNoise ForTestingOnly(uint64_t seed);
  // Secure(), or ForTestingOnly(test_seed) when a test gave one (test_seed ≠ 0).
  static absl::StatusOr<GaussianNoise> SecureUnlessTesting(uint64_t test_seed);

  GaussianNoise(GaussianNoise&&) noexcept;
  GaussianNoise& operator=(GaussianNoise&&) noexcept;
  ~GaussianNoise();

  double Sample();  // one N(0, 1)

 private:
  explicit GaussianNoise(const std::array<uint8_t, 32>& key);
  double Uniform();  // in (0, 1], 53 random bits
  double StandardBoxMuller();
  void Refill();

  struct Cipher;
  std::unique_ptr<Cipher> cipher_;
  std::array<uint8_t, 4096> block_{};
  size_t used_ = sizeof(block_);
  double spare_ = 0;
  bool has_spare_ = false;
};

// DP-SGD's noisy mean (Abadi et al. 2016, Algorithm 1: g̃ = (Σ_i clip(g_i) + N(0, σ²C²·I)) / L):
// each value of `sums`, the sum of the clipped records, gets N(0, stddev²) and is divided by
// `expected`, the number of records expected (L = q·N under Poisson sampling, N at q = 1). In
// place, in memory order, one sample per value, computed in double (rounded once for floats).
// Every DP mean in fedlora goes through it: DP-SGD's (trainer, regression workload) and
// client-level DP's (the mean of updates, LoRA-FAIR's correction, Fed-SB's sketches).
void NoisyMean(std::span<double> sums, double stddev, double expected, GaussianNoise& noise);
void NoisyMean(std::span<float> sums, double stddev, double expected, GaussianNoise& noise);

// Opacus' clipping factor min(1, C/(‖g‖ + 1e-6)): what scales a vector of norm `norm` to at most
// `max_norm`. Every flat clipping in fedlora uses it.
inline double ClipFactor(double norm, double max_norm) {
  return std::min(1.0, max_norm / (norm + 1e-6));
}

// A 64-bit seed from OpenSSL's RAND_bytes, for DP-SGD's Poisson sampling (which must be as secret
// as the noise).
absl::StatusOr<uint64_t> SecureSeed();

// ‖·‖₂ over all the values of all the spans, as one flat vector.
double FlatL2Norm(std::span<const std::span<float>> tensors);

// Scales all the values by ClipFactor so their flat norm is at most C; returns the norm before
// clipping.
double ClipFlatL2(std::span<const std::span<float>> tensors, double max_norm);

// Adaptive clipping of client updates (Andrew et al. 2021, "Differentially private learning with
// adaptive clipping", Algorithm 1, in TF-Privacy's sign convention — not Flower's, which reverses
// it):
//   b_i = 1[‖Δ_i‖ ≤ C];  b̄ = (Σ (b_i − ½) + N(0, σ_b²))/m + ½ clamped to [0, 1];  C ← C·exp(−η_C (b̄
//   − γ))
// where m is the expected number of clients per round. The update noise then uses the old C with
// the noise multiplier z_Δ = (z⁻² − (2σ_b)⁻²)^(−½), so that the round as a whole has noise
// multiplier z.
struct AdaptiveClipOptions {
  double initial_clip = 0.1;     // C at round 0
  double target_quantile = 0.5;  // γ: the fraction of updates that should end up unclipped
  double learning_rate = 0.2;    // η_C (geometric update)
  double count_stddev = -1;      // σ_b; < 0 means the default m/20
};

class AdaptiveClipper {
 public:
  static absl::StatusOr<AdaptiveClipper> Create(const AdaptiveClipOptions& options,
                                                double expected_clients);

  double clip() const { return clip_; }
  double count_stddev() const { return count_stddev_; }

  // z_Δ for the update noise given the round's total noise multiplier z: 1/z² = 1/z_Δ² + 1/(2σ_b)²,
  // as the count has sensitivity ½. INVALID_ARGUMENT when z ≥ 2σ_b (the count's noise alone would
  // spend the budget) or when σ_b = 0 and z > 0 (the count would go out without noise).
  absl::StatusOr<double> UpdateNoiseMultiplier(double z) const;

  // Moves C from this round's update norms (the norms before clipping).
  void Update(std::span<const double> update_norms, GaussianNoise& noise);

 private:
  AdaptiveClipper(const AdaptiveClipOptions& options, double expected_clients, double count_stddev)
      : options_(options),
        expected_clients_(expected_clients),
        count_stddev_(count_stddev),
        clip_(options.initial_clip) {}
  AdaptiveClipOptions options_;
  double expected_clients_;
  double count_stddev_;
  double clip_;
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_PRIVACY_DP_H_
