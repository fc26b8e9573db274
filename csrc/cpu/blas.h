// Row-major GEMM on raw pointers for the CPU time loop: C = A @ op(B) + beta C.
//
// Each step of the recurrence is a small GEMM (B x N times N x N); at small sizes
// creating tensors and dispatching an ATen op costs more than the arithmetic.
// When setup.py finds that torch's CPU library exports the Fortran BLAS symbols
// (MKL on x86-64, OpenBLAS on aarch64), it defines NNRNN_DIRECT_BLAS and the loop
// calls sgemm_/dgemm_ directly. Otherwise it wraps the pointers and uses at::mm.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>

#if defined(NNRNN_DIRECT_BLAS)
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc);
}
#endif

namespace nnrnn::cpu {

// Fortran BLAS takes 32-bit sizes, so a product with M >= 2^31 rows is split into
// calls of at most this many rows. NNRNN_BLAS_MAX_ROWS (read once) lowers the limit,
// so that tests can check the split without a 2^31-row tensor.
inline int64_t blas_max_rows() {
  static const int64_t rows = [] {
    const int64_t limit = std::numeric_limits<int32_t>::max();
    const char* env = std::getenv("NNRNN_BLAS_MAX_ROWS");
    const long long wanted = env ? std::atoll(env) : 0;
    return wanted > 0 && wanted < limit ? static_cast<int64_t>(wanted) : limit;
  }();
  return rows;
}

template <typename scalar_t>
void gemm_rowmajor_chunk(int64_t M, int64_t N, int64_t K, const scalar_t* A, const scalar_t* B,
                         bool transpose_b, bool accumulate, scalar_t* C) {
#if defined(NNRNN_DIRECT_BLAS)
  // Row-major C = A op(B) is column-major C^T = op(B)^T A^T.
  const int m = static_cast<int>(N), n = static_cast<int>(M), k = static_cast<int>(K);
  const int ldb = static_cast<int>(transpose_b ? K : N), lda = k, ldc = m;
  const char tb = transpose_b ? 'T' : 'N', ta = 'N';
  const scalar_t one = 1, beta = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgemm_(&tb, &ta, &m, &n, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
  } else {
    dgemm_(&tb, &ta, &m, &n, &k, &one, B, &ldb, A, &lda, &beta, C, &ldc);
  }
#else
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  auto a = at::from_blob(const_cast<scalar_t*>(A), {M, K}, opts);
  auto b = transpose_b ? at::from_blob(const_cast<scalar_t*>(B), {N, K}, opts).t()
                       : at::from_blob(const_cast<scalar_t*>(B), {K, N}, opts);
  auto c = at::from_blob(C, {M, N}, opts);
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
#endif
}

// C (M, N) = A (M, K) @ (transpose_b ? B^T : B), added to C when accumulate;
// all row-major and contiguous. B is (K, N), or (N, K) when transpose_b.
template <typename scalar_t>
void gemm_rowmajor(int64_t M, int64_t N, int64_t K, const scalar_t* A, const scalar_t* B,
                   bool transpose_b, bool accumulate, scalar_t* C) {
  if (M == 0 || N == 0) return;
  // Only M (the batch rows) can reach 2^31: N and K are the hidden size of an N x N matrix.
  const int64_t chunk = blas_max_rows();
  for (int64_t row = 0; row < M; row += chunk) {
    gemm_rowmajor_chunk<scalar_t>(std::min(chunk, M - row), N, K, A + row * K, B, transpose_b, accumulate,
                                  C + row * N);
  }
}

}  // namespace nnrnn::cpu
