// Argument checks shared by every backend of the op. Each failure names the
// argument and what was expected (TORCH_CHECK_VALUE raises ValueError in Python).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <string_view>

#include "activation.h"

namespace nnrnn {

struct Sizes {
  int64_t T, B, N;
};

Nonlinearity parse_nonlinearity(std::string_view name);

// x (T, B, N), W (N, N), b (N,), h0 (B, N), lengths (B,) integer. float16 and
// bfloat16 are CUDA-only, except in the host emulation of the CUDA kernels
// (half_on_cpu: ../cpu/emulated_cuda.cpp).
Sizes check_forward_inputs(const at::Tensor& x, const at::Tensor& W,
                           const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& h0,
                           const std::optional<at::Tensor>& lengths, bool half_on_cpu = false);

Sizes check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                            const at::Tensor& output, const at::Tensor& W,
                            const std::optional<at::Tensor>& h0,
                            const std::optional<at::Tensor>& lengths, bool half_on_cpu = false);

// Values of lengths in [0, T]; lengths must be on the CPU.
void check_length_values(const at::Tensor& lengths, int64_t T);

}  // namespace nnrnn
