#include "common/tensor/linalg.h"

#include <Eigen/Eigenvalues>
#include <Eigen/QR>
#include <Eigen/SVD>
#include <algorithm>
#include <cmath>

namespace fedlora::common {

Svd ThinSvd(const Eigen::MatrixXd& a) {
  Eigen::BDCSVD<Eigen::MatrixXd> svd(a, Eigen::ComputeThinU | Eigen::ComputeThinV);
  return {svd.matrixU(), svd.singularValues(), svd.matrixV()};
}

Eigen::VectorXd SingularValues(const Eigen::MatrixXd& a) {
  return Eigen::BDCSVD<Eigen::MatrixXd>(a).singularValues();
}

Qr ThinQr(const Eigen::MatrixXd& a) {
  const Eigen::Index p = std::min(a.rows(), a.cols());
  Eigen::HouseholderQR<Eigen::MatrixXd> qr(a);
  return {qr.householderQ() * Eigen::MatrixXd::Identity(a.rows(), p),
          qr.matrixQR().topRows(p).triangularView<Eigen::Upper>()};
}

SymmetricEigen EigenSymmetric(const Eigen::MatrixXd& a) {
  Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> eig(a);
  return {eig.eigenvalues(), eig.eigenvectors()};
}

double SpectralNorm(const MatrixD& a) {
  if (a.size() == 0) return 0;
  const MatrixD gram =
      a.rows() <= a.cols() ? MatrixD(a * a.transpose()) : MatrixD(a.transpose() * a);
  return std::sqrt(std::max(EigenSymmetric(gram).values.maxCoeff(), 0.0));
}

}  // namespace fedlora::common
