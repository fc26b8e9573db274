// The CUDA kernels (../cuda/kernels.h) and their host driver (../cuda/driver.h),
// run on CPU tensors with the grid emulated by host threads (host_grid.h): the
// CPU test of the kernels' logic (tests/test_cuda_emulation.py). Registered as
// nnrnn_fused::emulated_recurrence / emulated_recurrence_backward (schemas in
// ../cuda_ops.cpp) with the launch shape as arguments. Slow; for small sizes.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../cuda/driver.h"
#include "host_grid.h"

namespace nnrnn::kern {
namespace {

struct HostLauncher {
  Plan p;

  Plan plan(int64_t, int64_t, at::ScalarType) const { return p; }

  at::Tensor lengths(const at::Tensor& l, int64_t T) const {
    TORCH_CHECK_VALUE(l.is_cpu(), "emulated_recurrence: lengths must be on the CPU");
    check_length_values(l, T);
    return l.to(at::kInt).contiguous();
  }

  // Test hook: NNRNN_EMULATE_REFUSED_LAUNCH=1 refuses every persistent launch, as
  // a GPU refuses a cooperative launch whose blocks cannot all be resident.
  template <class Body>
  std::string persistent(const Body& body, const Layout& L, int threads, size_t bytes) const {
    const char* refuse = std::getenv("NNRNN_EMULATE_REFUSED_LAUNCH");
    if (refuse != nullptr && std::string(refuse) == "1") return "emulated refusal: NNRNN_EMULATE_REFUSED_LAUNCH=1";
    host_launch(L.grid(), threads, bytes, body);
    return "";
  }

  template <class Body>
  void pointwise(const Body& body, int64_t) const {
    host_launch(p.col_groups * p.row_groups, p.threads, 0, body);  // the body strides over all elements
  }
};

HostLauncher make_launcher(const at::Tensor& x, int64_t col_groups, int64_t row_groups, int64_t threads,
                           int64_t rows_per_tile, bool persistent) {
  TORCH_CHECK_VALUE(x.is_cpu(), "emulated_recurrence: runs on CPU tensors, got ", x.device());
  TORCH_CHECK_VALUE(col_groups >= 1 && row_groups >= 1 && threads >= 1 && rows_per_tile >= 1,
                    "emulated_recurrence: col_groups, row_groups, threads and rows_per_tile must be >= 1, got ",
                    col_groups, ", ", row_groups, ", ", threads, ", ", rows_per_tile);
  TORCH_CHECK_VALUE(col_groups * row_groups * threads <= 1024,
                    "emulated_recurrence: at most 1024 host threads (col_groups x row_groups x threads), got ",
                    col_groups * row_groups * threads);
  Plan p;
  p.persistent = persistent;
  p.col_groups = static_cast<int>(col_groups);
  p.row_groups = static_cast<int>(row_groups);
  p.threads = static_cast<int>(threads);
  p.rows_per_tile = static_cast<int>(rows_per_tile);
  return {p};
}

std::tuple<at::Tensor, at::Tensor> emulated_forward(const at::Tensor& x, const at::Tensor& W,
                                                    const std::optional<at::Tensor>& b,
                                                    const std::optional<at::Tensor>& h0,
                                                    const std::optional<at::Tensor>& lengths,
                                                    c10::string_view nonlinearity, int64_t col_groups,
                                                    int64_t row_groups, int64_t threads, int64_t rows_per_tile,
                                                    bool persistent) {
  auto launcher = make_launcher(x, col_groups, row_groups, threads, rows_per_tile, persistent);
  return run_forward(launcher, x, W, b, h0, lengths, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output, const at::Tensor& W,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths, c10::string_view nonlinearity,
    int64_t col_groups, int64_t row_groups, int64_t threads, int64_t rows_per_tile, bool persistent) {
  auto launcher = make_launcher(output, col_groups, row_groups, threads, rows_per_tile, persistent);
  return run_backward(launcher, grad_output, grad_h_n, output, W, h0, lengths, nonlinearity);
}

}  // namespace
}  // namespace nnrnn::kern

TORCH_LIBRARY_IMPL(nnrnn_fused, CPU, m) {
  m.impl("emulated_recurrence", &nnrnn::kern::emulated_forward);
  m.impl("emulated_recurrence_backward", &nnrnn::kern::emulated_backward);
}
