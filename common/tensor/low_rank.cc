#include "common/tensor/low_rank.h"

#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>

namespace fedlora::common {

TruncatedProduct TruncateProduct(const MatrixD& u, const MatrixD& v, int k) {
  const Eigen::Index m = u.rows(), n = v.cols(), r = u.cols();
  const Eigen::Index p = std::min({r, m, n});
  k = static_cast<int>(std::clamp<Eigen::Index>(k, 0, p));
  // Thin QR: Qu (m×p'), Ru (p'×R) with p' = min(m, R); likewise for Vᵀ.
  Eigen::HouseholderQR<Eigen::MatrixXd> qr_u(u), qr_v(v.transpose());
  const Eigen::Index pu = std::min(m, r), pv = std::min(n, r);
  const Eigen::MatrixXd qu = qr_u.householderQ() * Eigen::MatrixXd::Identity(m, pu);
  const Eigen::MatrixXd qv = qr_v.householderQ() * Eigen::MatrixXd::Identity(n, pv);
  const Eigen::MatrixXd ru = qr_u.matrixQR().topRows(pu).triangularView<Eigen::Upper>();
  const Eigen::MatrixXd rv = qr_v.matrixQR().topRows(pv).triangularView<Eigen::Upper>();
  Eigen::BDCSVD<Eigen::MatrixXd> svd(ru * rv.transpose(),
                                     Eigen::ComputeThinU | Eigen::ComputeThinV);
  TruncatedProduct out;
  out.singular = svd.singularValues().head(p);
  const Eigen::VectorXd sigma = svd.singularValues().head(k);
  out.b = qu * svd.matrixU().leftCols(k) * sigma.asDiagonal();
  out.a = (qv * svd.matrixV().leftCols(k)).transpose();
  const double total = out.singular.squaredNorm();
  out.retained_energy = total > 0 ? sigma.squaredNorm() / total : 1.0;
  return out;
}

}  // namespace fedlora::common
