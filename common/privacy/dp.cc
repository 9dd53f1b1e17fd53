#include "common/privacy/dp.h"

#include <openssl/evp.h>
#include <openssl/rand.h>
#include <openssl/sha.h>

#include <cmath>
#include <cstring>

#include "common/base/strings.h"

namespace fedlora::common {

struct GaussianNoise::Cipher {
  EVP_CIPHER_CTX* ctx = nullptr;
  ~Cipher() { EVP_CIPHER_CTX_free(ctx); }
};

GaussianNoise::GaussianNoise(const std::array<uint8_t, 32>& key)
    : cipher_(std::make_unique<Cipher>()) {
  static const uint8_t kIv[16] = {};  // A fresh key per generator, so a zero counter start is safe.
  cipher_->ctx = EVP_CIPHER_CTX_new();
  EVP_EncryptInit_ex(cipher_->ctx, EVP_aes_256_ctr(), nullptr, key.data(), kIv);
}

GaussianNoise::GaussianNoise(GaussianNoise&&) noexcept = default;
GaussianNoise& GaussianNoise::operator=(GaussianNoise&&) noexcept = default;
GaussianNoise::~GaussianNoise() = default;

absl::StatusOr<GaussianNoise> GaussianNoise::Secure() {
  std::array<uint8_t, 32> key;
  if (RAND_bytes(key.data(), static_cast<int>(key.size())) != 1) {
    return absl::UnavailableError(
        "OpenSSL's RAND_bytes could not provide a key for the DP noise generator");
  }
  GaussianNoise noise(key);
  OPENSSL_cleanse(key.data(), key.size());
  return noise;
}

absl::StatusOr<GaussianNoise> GaussianNoise::SecureUnlessTesting(uint64_t test_seed) {
  if (test_seed != 0) return ForTestingOnly(test_seed);
  return Secure();
}

GaussianNoise GaussianNoise::ForTestingOnly(uint64_t seed) {
  std::array<uint8_t, 32> key;
  SHA256(reinterpret_cast<const uint8_t*>(&seed), sizeof seed, key.data());
  return GaussianNoise(key);
}

void GaussianNoise::Refill() {
  static const uint8_t kZeros[sizeof(block_)] = {};
  int out_len = 0;
  EVP_EncryptUpdate(cipher_->ctx, block_.data(), &out_len, kZeros,
                    static_cast<int>(sizeof(block_)));
  used_ = 0;
}

double GaussianNoise::Uniform() {
  if (used_ + 8 > block_.size()) Refill();
  uint64_t bits;
  std::memcpy(&bits, block_.data() + used_, 8);
  used_ += 8;
  return static_cast<double>((bits >> 11) + 1) * 0x1.0p-53;  // (0, 1]: log() below never sees 0
}

double GaussianNoise::StandardBoxMuller() {
  if (has_spare_) {
    has_spare_ = false;
    return spare_;
  }
  const double radius = std::sqrt(-2.0 * std::log(Uniform()));
  const double angle = 2.0 * M_PI * Uniform();
  spare_ = radius * std::sin(angle);
  has_spare_ = true;
  return radius * std::cos(angle);
}

double GaussianNoise::Sample() {
  return (StandardBoxMuller() + StandardBoxMuller() + StandardBoxMuller() + StandardBoxMuller()) /
         2.0;
}

namespace {

template <typename T>
void NoisyMeanOf(std::span<T> sums, double stddev, double expected, GaussianNoise& noise) {
  for (T& x : sums) x = static_cast<T>((x + stddev * noise.Sample()) / expected);
}

}  // namespace

void NoisyMean(std::span<double> sums, double stddev, double expected, GaussianNoise& noise) {
  NoisyMeanOf(sums, stddev, expected, noise);
}

void NoisyMean(std::span<float> sums, double stddev, double expected, GaussianNoise& noise) {
  NoisyMeanOf(sums, stddev, expected, noise);
}

absl::StatusOr<uint64_t> SecureSeed() {
  uint64_t seed = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&seed), sizeof seed) != 1)
    return absl::InternalError("OpenSSL's RAND_bytes could not provide a seed for DP sampling");
  return seed;
}

double FlatL2Norm(std::span<const std::span<float>> tensors) {
  double sum = 0;
  for (std::span<float> t : tensors) {
    for (float v : t) sum += static_cast<double>(v) * v;
  }
  return std::sqrt(sum);
}

double ClipFlatL2(std::span<const std::span<float>> tensors, double max_norm) {
  const double norm = FlatL2Norm(tensors);
  const double factor = ClipFactor(norm, max_norm);
  if (factor < 1.0) {
    for (std::span<float> t : tensors) {
      for (float& v : t) v = static_cast<float>(v * factor);
    }
  }
  return norm;
}

absl::StatusOr<AdaptiveClipper> AdaptiveClipper::Create(const AdaptiveClipOptions& options,
                                                        double expected_clients) {
  if (!(options.initial_clip > 0)) {
    return absl::InvalidArgumentError(
        StrCat("initial clip is ", options.initial_clip, "; it must be > 0"));
  }
  if (!(options.target_quantile >= 0 && options.target_quantile <= 1)) {
    return absl::InvalidArgumentError(
        StrCat("target quantile is ", options.target_quantile, "; it must be in [0, 1]"));
  }
  if (!(expected_clients > 0)) {
    return absl::InvalidArgumentError(
        StrCat("expected clients per round is ", expected_clients, "; it must be > 0"));
  }
  const double sigma_b = options.count_stddev < 0 ? expected_clients / 20.0 : options.count_stddev;
  return AdaptiveClipper(options, expected_clients, sigma_b);
}

absl::StatusOr<double> AdaptiveClipper::UpdateNoiseMultiplier(double z) const {
  if (z == 0) return 0.0;
  if (count_stddev_ == 0) {
    return absl::InvalidArgumentError(
        StrCat("noise multiplier ", z,
               " asks for privacy but the clipped-count noise sigma_b is 0: the count of unclipped "
               "updates would be released as it is; set it > ",
               z / 2));
  }
  const double rest = 1.0 / (z * z) - 1.0 / (4 * count_stddev_ * count_stddev_);
  if (!(rest > 0)) {
    return absl::InvalidArgumentError(StrCat(
        "noise multiplier ", z,
        " leaves nothing for the update after the clipped-count noise (sigma_b = ", count_stddev_,
        "); it must be below 2*sigma_b = ", 2 * count_stddev_));
  }
  return 1.0 / std::sqrt(rest);
}

void AdaptiveClipper::Update(std::span<const double> update_norms, GaussianNoise& noise) {
  double centered = 0;  // Σ (b_i − ½)
  for (double norm : update_norms) centered += (norm <= clip_ ? 1.0 : 0.0) - 0.5;
  const double noised = centered + (count_stddev_ > 0 ? count_stddev_ * noise.Sample() : 0.0);
  const double fraction = std::clamp(noised / expected_clients_ + 0.5, 0.0, 1.0);
  clip_ *= std::exp(-options_.learning_rate * (fraction - options_.target_quantile));
}

}  // namespace fedlora::common
