// The best rank-k approximation of a product U·V (U: m×R, V: R×n) by truncated SVD, without forming
// the m×n matrix (ALGORITHMS.md, FLoRA exports): U = Qu·Ru, Vᵀ = Qv·Rv (thin QR), SVD of the R×R
// core Ru·Rvᵀ = Û·Σ·V̂ᵀ, so U·V = (Qu·Û)·Σ·(Qv·V̂)ᵀ. Costs O((m + n)·R²) instead of O(m·n·R).
#ifndef FEDLORA_COMMON_TENSOR_LOW_RANK_H_
#define FEDLORA_COMMON_TENSOR_LOW_RANK_H_

#include "common/tensor/eigen_types.h"

namespace fedlora::common {

struct TruncatedProduct {
  MatrixD b;  // m×k: Qu·Û_k·Σ_k (the singular values go on the B side, as LoRA's B·A)
  MatrixD a;  // k×n: (Qv·V̂_k)ᵀ, orthonormal rows
  Eigen::VectorXd singular;    // all min(R, m, n) singular values of U·V, descending
  double retained_energy = 1;  // Σ_{i≤k} σ_i² / Σ_i σ_i² (1 for a zero product)
};

// k is capped at the product's rank bound min(R, m, n).
TruncatedProduct TruncateProduct(const MatrixD& u, const MatrixD& v, int k);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_LOW_RANK_H_
