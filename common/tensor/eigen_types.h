// fedlora's Eigen vocabulary. Everything that crosses the wire or comes from PyTorch is row-major,
// so a [rows, cols] tensor in a safetensors file maps onto a matrix without a copy or a transpose.
#ifndef FEDLORA_COMMON_TENSOR_EIGEN_TYPES_H_
#define FEDLORA_COMMON_TENSOR_EIGEN_TYPES_H_

#include <Eigen/Dense>

namespace fedlora::common {

using MatrixF = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MatrixD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using MapF = Eigen::Map<MatrixF>;
using ConstMapF = Eigen::Map<const MatrixF>;

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_EIGEN_TYPES_H_
