#include "common/tensor/low_rank.h"

#include <algorithm>

#include "common/tensor/linalg.h"

namespace fedlora::common {

TruncatedProduct TruncateProduct(const MatrixD& u, const MatrixD& v, int k) {
  const Eigen::Index m = u.rows(), n = v.cols(), r = u.cols();
  const Eigen::Index p = std::min({r, m, n});
  k = static_cast<int>(std::clamp<Eigen::Index>(k, 0, p));
  // Thin QR: Qu (m×p'), Ru (p'×R) with p' = min(m, R); likewise for Vᵀ.
  const Qr qr_u = ThinQr(u), qr_v = ThinQr(v.transpose());
  const Svd svd = ThinSvd(qr_u.r * qr_v.r.transpose());
  TruncatedProduct out;
  out.singular = svd.s.head(p);
  const Eigen::VectorXd sigma = svd.s.head(k);
  out.b = qr_u.q * svd.u.leftCols(k) * sigma.asDiagonal();
  out.a = (qr_v.q * svd.v.leftCols(k)).transpose();
  const double total = out.singular.squaredNorm();
  out.retained_energy = total > 0 ? sigma.squaredNorm() / total : 1.0;
  return out;
}

}  // namespace fedlora::common
