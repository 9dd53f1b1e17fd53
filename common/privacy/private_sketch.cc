#include "common/privacy/private_sketch.h"

#include "common/base/strings.h"
#include "common/tensor/linalg.h"

namespace fedlora::common {

absl::Status CheckSketchBases(std::span<const MatrixD> bases) {
  for (size_t i = 0; i < bases.size(); ++i) {
    if (bases[i].size() == 0) continue;
    const double norm = SingularValues(bases[i])(0);
    if (!(norm <= 1 + 1e-9)) {
      return absl::InvalidArgumentError(
          StrCat("the sketch basis of module ", i, " has spectral norm ", norm,
                 "; under DP a basis must not stretch the gradient (at most 1, as an orthonormal "
                 "basis), or the noise would not cover one record"));
    }
  }
  return absl::OkStatus();
}

void AddClippedRecord(std::span<const MatrixD> products, double norm, double clip,
                      std::span<MatrixD> sums) {
  const double factor = ClipFactor(norm, clip);
  for (size_t i = 0; i < sums.size(); ++i) sums[i] += factor * products[i];
}

void NoisyMean(std::span<MatrixD> sums, double stddev, double records, GaussianNoise& noise) {
  for (MatrixD& s : sums)
    NoisyMean(std::span<double>(s.data(), static_cast<size_t>(s.size())), stddev, records, noise);
}

}  // namespace fedlora::common
