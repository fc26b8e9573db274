// Extra ops around the CUDA kernels, defined in every build (with or without CUDA):
//
//   cuda_path(N, B, dtype, device) -> str
//       which path recurrence takes on that device: "persistent", or
//       "fallback: <reason>", or "unavailable: <reason>"; no tensor arguments,
//       so one implementation serves every backend.
//   emulated_recurrence(..., col_groups, row_groups, threads, rows_per_tile, persistent)
//   emulated_recurrence_backward(..., col_groups, row_groups, threads, rows_per_tile, persistent)
//       the CUDA kernels' source run on CPU tensors by a host emulation of the
//       grid (cpu/emulated_cuda.cpp), with the given launch shape: a test of the
//       kernels' logic on machines without a GPU.
#include <torch/library.h>

#include <string>

#include "checks.h"
#include "cuda/path.h"

namespace nnrnn {
namespace {

std::string cuda_path(int64_t N, int64_t B, c10::ScalarType dtype, c10::Device device) {
  TORCH_CHECK_VALUE(N >= 0 && B >= 0, "cuda_path: N and B must be >= 0, got N = ", N, ", B = ", B);
  TORCH_CHECK_VALUE(device.is_cuda(), "cuda_path: device must be a CUDA device, got ", device);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    "cuda_path: unsupported dtype ", dtype, "; supported: float32, float64, float16, bfloat16");
#if defined(NNRNN_WITH_CUDA)
  return cuda::describe_path(N, B, dtype, device.has_index() ? device.index() : -1);
#else
  return "unavailable: the extension was built without its CUDA kernels";
#endif
}

}  // namespace
}  // namespace nnrnn

TORCH_LIBRARY_FRAGMENT(nnrnn_fused, m) {
  m.def("cuda_path(int N, int B, ScalarType dtype, Device device) -> str", &nnrnn::cuda_path);
  m.def(
      "emulated_recurrence(Tensor x, Tensor W, Tensor? b, Tensor? h0, Tensor? lengths, str nonlinearity,"
      " int col_groups, int row_groups, int threads, int rows_per_tile, bool persistent)"
      " -> (Tensor output, Tensor h_n)");
  m.def(
      "emulated_recurrence_backward(Tensor grad_output, Tensor grad_h_n, Tensor output, Tensor W,"
      " Tensor? h0, Tensor? lengths, str nonlinearity, int col_groups, int row_groups, int threads,"
      " int rows_per_tile, bool persistent) -> (Tensor grad_x, Tensor grad_W, Tensor grad_b, Tensor grad_h0)");
}
