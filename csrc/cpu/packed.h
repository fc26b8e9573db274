// The packed CPU path (packed_kernels.h) as seen by recurrence_cpu.cpp: which
// shapes take it, and one call per direction on raw pointers.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>
#include <vector>

#include "../activation.h"

namespace nnrnn::cpu {

struct CpuPath {
  bool packed;
  int64_t slices;  // batch slices: blocks of rows that run their time loops on threads of their own
  std::string description;  // "packed: avx512, 2 batch slices, 2 threads" or "blas: <why>, 1 batch slice"
};

// The path recurrence takes for hidden size N and batch B: the packed kernels
// where the measured crossover table says they are faster, else one BLAS GEMM per
// step; and into how many batch slices it splits the rows. NNRNN_CPU_KERNEL=
// packed|blas forces a path (read at every call), NNRNN_CPU_SLICES=<n> the slices;
// NNRNN_CPU_ISA=avx512|avx2|generic caps the packed kernels' instruction set.
CpuPath choose_cpu_path(int64_t N, int64_t B, c10::ScalarType dtype);

// W as the kernels read it: element (k, j) at data[k * row_stride + j * col_stride]. W is
// packed once per call anyway, so packing it from its strides spares a transposed or
// sliced W the copy that .contiguous() would make.
template <typename T>
struct StridedMatrix {
  const T* data;
  int64_t row_stride, col_stride;
};

// x and out (steps, B, N), contiguous: out gets h_t; lengths empty or (B,).
template <typename T>
void packed_forward(int64_t steps, int64_t B, int64_t N, int64_t slices, const T* x, StridedMatrix<T> W, const T* bias,
                    const T* h0, const std::vector<int64_t>& lengths, Nonlinearity f, T* out);

// dx (steps, B, N), dW (N, N), db (N, double) and grad_h0 (B, N), contiguous, are written whole.
template <typename T>
void packed_backward(int64_t steps, int64_t B, int64_t N, int64_t slices, StridedMatrix<T> W, const T* out,
                     const T* grad_out, const T* grad_h_n, const T* h0, const std::vector<int64_t>& lengths,
                     Nonlinearity f, T* dx, T* dW, double* db, T* grad_h0);

}  // namespace nnrnn::cpu
