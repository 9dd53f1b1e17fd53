// DP-SGD on a client's answer to a Fed-SB initialisation step (common/aggregation/sketch.h): the
// answer is, per module, a product of the gradient G = (1/N)·Σ_i g_i over the client's N records
// with that module's basis. Under DP every record takes part (sampling rate 1); its gradient g_i,
// flat over all the modules, is clipped to C; the clipped records' products are summed,
// N(0, (σ·C)²) is added to every entry and the sum is divided by N. That is one Gaussian mechanism
// of noise multiplier σ, one step at q = 1 for the client's accountant. The sum moves by at most C
// when one record comes or goes only if no basis stretches a vector (‖basis‖₂ ≤ 1, true of the
// orthonormal bases fedlora sends): CheckSketchBases refuses any other, which a coordinator could
// use to amplify one record against the noise.
#ifndef FEDLORA_COMMON_PRIVACY_PRIVATE_SKETCH_H_
#define FEDLORA_COMMON_PRIVACY_PRIVATE_SKETCH_H_

#include <span>

#include "absl/status/status.h"
#include "common/privacy/dp.h"
#include "common/tensor/eigen_types.h"

namespace fedlora::common {

// INVALID_ARGUMENT naming the module when a basis's largest singular value passes 1 (+1e-9).
absl::Status CheckSketchBases(std::span<const MatrixD> bases);

// Adds one record's products (one per module), scaled by ClipFactor(norm, clip), to `sums`; `norm`
// is the record's gradient norm, flat over every module.
void AddClippedRecord(std::span<const MatrixD> products, double norm, double clip,
                      std::span<MatrixD> sums);

// dp.h's NoisyMean over every module's sum: (sums + N(0, stddev²) on every entry) / records, in
// place.
void NoisyMean(std::span<MatrixD> sums, double stddev, double records, GaussianNoise& noise);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_PRIVACY_PRIVATE_SKETCH_H_
