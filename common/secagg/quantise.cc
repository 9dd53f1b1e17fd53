#include "common/secagg/quantise.h"

#include <algorithm>
#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/secagg/crypto.h"
#include "common/secagg/dp.h"

namespace fedlora::secagg {
namespace {

using common::StrCat;

}  // namespace

void SetQuantisation(const Quantisation& q, v1::SecAggConfig& config) {
  config.set_length(static_cast<int64_t>(q.length));
  config.set_clip(q.clip);
  config.set_scale(q.scale);
  config.set_clamp(q.clamp);
  config.set_noise_num(q.noise_num);
  config.set_noise_den(q.noise_den);
  config.set_bits(q.bits);
}

absl::StatusOr<Encoded> Encode(std::span<const double> x, const v1::SecAggConfig& config) {
  if (x.size() != static_cast<size_t>(config.length()))
    return absl::InvalidArgumentError(
        StrCat("an update of ", x.size(), " values; secure aggregation expects ", config.length()));
  Encoded out;
  double squares = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    if (!std::isfinite(x[i]))
      return absl::InvalidArgumentError(StrCat("value ", i, " of the update is ", x[i]));
    squares += x[i] * x[i];
  }
  out.norm = std::sqrt(squares);
  const double factor = out.norm > config.clip() ? config.clip() / out.norm : 1.0;
  std::vector<double> clipped(x.begin(), x.end());
  for (double& v : clipped) v *= factor;
  ASSIGN_OR_RETURN(std::vector<double> rotated, Rotate(clipped, config.rotation_seed()));
  ASSIGN_OR_RETURN(std::vector<int64_t> rounded, StochasticRound(rotated, config.scale()));
  const uint64_t mask = WordMask(config.bits());
  out.words.resize(rounded.size());
  for (size_t i = 0; i < rounded.size(); ++i) {
    int64_t v = std::clamp<int64_t>(rounded[i], -config.clamp(), config.clamp());
    out.clamped += v != rounded[i];
    if (config.noise_num() > 0) {
      ASSIGN_OR_RETURN(const int64_t noise,
                       DiscreteGaussian(config.noise_num(), config.noise_den()));
      v += noise;
    }
    out.words[i] = static_cast<uint64_t>(v) & mask;
  }
  return out;
}

absl::StatusOr<std::vector<double>> Decode(std::span<const uint64_t> sum,
                                           const v1::SecAggConfig& config) {
  const size_t length = static_cast<size_t>(config.length());
  if (sum.size() != RotatedLength(length))
    return absl::InvalidArgumentError(
        StrCat("a sum of ", sum.size(), " values; expected ", RotatedLength(length)));
  const int bits = config.bits();
  const uint64_t half = uint64_t{1} << (bits - 1);
  std::vector<double> y(sum.size());
  for (size_t i = 0; i < sum.size(); ++i) {
    // The representative in [−2^(bits−1), 2^(bits−1)).
    const int64_t v = sum[i] >= half ? static_cast<int64_t>(sum[i]) - (int64_t{1} << bits)
                                     : static_cast<int64_t>(sum[i]);
    y[i] = static_cast<double>(v) / config.scale();
  }
  return Unrotate(y, config.rotation_seed(), length);
}

size_t PackedBytes(size_t count, int bits) { return (count * static_cast<size_t>(bits) + 7) / 8; }

std::string PackWords(std::span<const uint64_t> words, int bits) {
  std::string out(PackedBytes(words.size(), bits), '\0');
  size_t bit = 0;
  for (uint64_t w : words) {
    for (int left = bits; left > 0;) {
      const int at = static_cast<int>(bit % 8), take = std::min(left, 8 - at);
      out[bit / 8] = static_cast<char>(static_cast<unsigned char>(out[bit / 8]) |
                                       ((w & ((1u << take) - 1)) << at));
      w >>= take;
      left -= take;
      bit += static_cast<size_t>(take);
    }
  }
  return out;
}

absl::StatusOr<std::vector<uint64_t>> UnpackWords(std::string_view bytes, int bits, size_t count) {
  if (bytes.size() != PackedBytes(count, bits))
    return absl::InvalidArgumentError(StrCat("a masked input of ", bytes.size(),
                                             " bytes; expected ", PackedBytes(count, bits), " (",
                                             count, " values of ", bits, " bits)"));
  std::vector<uint64_t> out(count);
  size_t bit = 0;
  for (uint64_t& w : out) {
    for (int got = 0; got < bits;) {
      const int at = static_cast<int>(bit % 8), take = std::min(bits - got, 8 - at);
      const uint64_t piece =
          (static_cast<unsigned char>(bytes[bit / 8]) >> at) & ((1u << take) - 1);
      w |= piece << got;
      got += take;
      bit += static_cast<size_t>(take);
    }
  }
  // The last byte's spare bits must be zero: one encoding per input.
  if (bit % 8 != 0 && (static_cast<unsigned char>(bytes.back()) >> (bit % 8)) != 0)
    return absl::InvalidArgumentError("a masked input's padding bits are not zero");
  return out;
}

}  // namespace fedlora::secagg
