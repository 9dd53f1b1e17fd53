// The dense decompositions fedlora uses, compiled once here: each of Eigen's decompositions costs
// tens of seconds of compile in every translation unit that instantiates it (BDCSVD about 30 s), so
// the rest of the code calls these instead. Column-major, as Eigen's solvers work; a row-major
// MatrixD converts on the call.
#ifndef FEDLORA_COMMON_TENSOR_LINALG_H_
#define FEDLORA_COMMON_TENSOR_LINALG_H_

#include "common/tensor/eigen_types.h"

namespace fedlora::common {

// a = u·diag(s)·vᵀ with p = min(m, n): u m×p and v n×p with orthonormal columns, s descending, ≥ 0.
struct Svd {
  Eigen::MatrixXd u;
  Eigen::VectorXd s;
  Eigen::MatrixXd v;
};
Svd ThinSvd(const Eigen::MatrixXd& a);
Eigen::VectorXd SingularValues(const Eigen::MatrixXd& a);

// a = q·r (Householder) with p = min(m, n): q m×p with orthonormal columns, r p×n upper triangular.
struct Qr {
  Eigen::MatrixXd q;
  Eigen::MatrixXd r;
};
Qr ThinQr(const Eigen::MatrixXd& a);

// A symmetric a = vectors·diag(values)·vectorsᵀ, values ascending.
struct SymmetricEigen {
  Eigen::VectorXd values;
  Eigen::MatrixXd vectors;
};
SymmetricEigen EigenSymmetric(const Eigen::MatrixXd& a);

// ‖a‖₂, the largest singular value, from the smaller of a·aᵀ and aᵀ·a.
double SpectralNorm(const MatrixD& a);

// ⟨a, b⟩_F = Σ a_ij·b_ij.
inline double FrobeniusDot(const MatrixD& a, const MatrixD& b) {
  return (a.array() * b.array()).sum();
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_LINALG_H_
