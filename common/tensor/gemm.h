// Row-major single-precision matrix products on OpenBLAS.
#ifndef FEDLORA_COMMON_TENSOR_GEMM_H_
#define FEDLORA_COMMON_TENSOR_GEMM_H_

#include <cblas.h>

#include <cstdint>

namespace fedlora::common {

// C = alpha·op(A)·op(B) + beta·C, op transposing when ta / tb; C is m×n, the inner size k.
inline void Gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans,
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_GEMM_H_
