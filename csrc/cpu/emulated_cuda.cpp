// The CUDA kernels (../cuda/kernels.h, kernels_v2.h) and their host driver
// (../cuda/driver.h), run on CPU tensors with the grid emulated by host threads
// (host_grid.h): the CPU test of the kernels' logic (tests/test_cuda_emulation.py).
// Registered as nnrnn_fused::emulated_recurrence[_backward] (kernel v1 and the
// fallback), emulated_recurrence_v2[_backward] and emulated_recurrence_tc[_backward]
// (the tensor-core path; schemas in ../cuda_ops.cpp) with the launch shape as
// arguments. Slow; for small sizes.
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "../cuda/driver.h"
#include "host_grid.h"

namespace nnrnn::kern {
namespace {

constexpr int64_t kMaxHostThreads = 1024;

struct HostLauncher {
  Plan p;
  static constexpr bool kHostEmulation = true;  // float16/bfloat16 CPU tensors are accepted

  Plan plan(int64_t, int64_t, at::ScalarType) const { return p; }

  at::Tensor lengths(const at::Tensor& l, int64_t T) const {
    TORCH_CHECK_VALUE(l.is_cpu(), "emulated_recurrence: lengths must be on the CPU");
    check_length_values(l, T);
    return l.to(at::kInt).contiguous();
  }

  // Test hook: NNRNN_EMULATE_REFUSED_LAUNCH=1 refuses every persistent launch, as
  // a GPU refuses a cooperative launch whose blocks cannot all be resident.
  static bool refused() {
    const char* refuse = std::getenv("NNRNN_EMULATE_REFUSED_LAUNCH");
    return refuse != nullptr && std::string(refuse) == "1";
  }

  template <class Body>
  std::string persistent(const Body& body, const Layout& L, int threads, size_t bytes) const {
    if (refused()) return "emulated refusal: NNRNN_EMULATE_REFUSED_LAUNCH=1";
    host_launch(L.grid(), threads, bytes, body);
    return "";
  }

  // Kernel v2 with a small register tile (4 values of k for 2 columns, warps of 4
  // lanes), so that small N already has several k-chunks, lanes of a warp on
  // different chunks, column warps and producers per chunk.
  template <typename acc_t>
  using V2Shape = TileShape<4, 2, 4>;

  // The GPU can refuse cluster and cooperative launches, not plain ones (Block).
  template <class Body>
  std::string team(const Body& body, const LayoutV2& L, size_t bytes) const {
    if (refused() && L.exchange != Exchange::Block) return "emulated refusal: NNRNN_EMULATE_REFUSED_LAUNCH=1";
    TORCH_CHECK_VALUE(static_cast<int64_t>(L.grid()) * L.threads() <= kMaxHostThreads,
                      "emulated_recurrence_v2: at most ", kMaxHostThreads, " host threads, the layout needs ",
                      static_cast<int64_t>(L.grid()) * L.threads());
    host_launch(L.grid(), L.threads(), bytes, body, L.exchange == Exchange::Cluster ? L.team_blocks : 1, L.lanes);
    return "";
  }

  // The tensor-core path with 1 or 2 instructions along k per warp, so that small N
  // already has several k-chunks (the GPU's 8 and 16 run the same code).
  using TcKts = KtList<1, 2>;

  template <class Body>
  std::string tc(const Body& body, const TcLayout& L) const {
    if (refused() && L.exchange != Exchange::Block) return "emulated refusal: NNRNN_EMULATE_REFUSED_LAUNCH=1";
    TORCH_CHECK_VALUE(static_cast<int64_t>(L.grid()) * L.threads() <= kMaxHostThreads,
                      "emulated_recurrence_tc: at most ", kMaxHostThreads, " host threads, the layout needs ",
                      static_cast<int64_t>(L.grid()) * L.threads());
    host_launch(L.grid(), L.threads(), L.shared_bytes(), body, L.exchange == Exchange::Cluster ? L.team_blocks : 1,
                32);
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
  TORCH_CHECK_VALUE(col_groups * row_groups * threads <= kMaxHostThreads,
                    "emulated_recurrence: at most 1024 host threads (col_groups x row_groups x threads), got ",
                    col_groups * row_groups * threads);
  Plan p;
  p.persistent = persistent;
  p.version = 1;
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

Exchange parse_exchange(c10::string_view name) {
  if (name == "block") return Exchange::Block;
  if (name == "cluster") return Exchange::Cluster;
  if (name == "grid") return Exchange::Grid;
  TORCH_CHECK_VALUE(false, "emulated_recurrence: exchange must be 'block', 'cluster' or 'grid', got '", name, "'");
}

HostLauncher make_v2_launcher(const at::Tensor& x, c10::string_view exchange, int64_t team_blocks, int64_t teams,
                              int64_t rows_per_tile) {
  TORCH_CHECK_VALUE(x.is_cpu(), "emulated_recurrence_v2: runs on CPU tensors, got ", x.device());
  TORCH_CHECK_VALUE(team_blocks >= 1 && teams >= 1 && rows_per_tile >= 1,
                    "emulated_recurrence_v2: team_blocks, teams and rows_per_tile must be >= 1, got ", team_blocks,
                    ", ", teams, ", ", rows_per_tile);
  Plan p;
  p.persistent = true;
  p.version = 2;
  p.exchange = parse_exchange(exchange);
  TORCH_CHECK_VALUE(p.exchange != Exchange::Block || team_blocks == 1,
                    "emulated_recurrence_v2: the block exchange has one block per team, got ", team_blocks);
  p.col_groups = static_cast<int>(team_blocks);
  p.row_groups = static_cast<int>(teams);
  p.rows_per_tile = static_cast<int>(rows_per_tile);
  return {p};
}

std::tuple<at::Tensor, at::Tensor> emulated_forward_v2(const at::Tensor& x, const at::Tensor& W,
                                                       const std::optional<at::Tensor>& b,
                                                       const std::optional<at::Tensor>& h0,
                                                       const std::optional<at::Tensor>& lengths,
                                                       c10::string_view nonlinearity, c10::string_view exchange,
                                                       int64_t team_blocks, int64_t teams, int64_t rows_per_tile) {
  auto launcher = make_v2_launcher(x, exchange, team_blocks, teams, rows_per_tile);
  return run_forward(launcher, x, W, b, h0, lengths, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_backward_v2(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output, const at::Tensor& W,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths, c10::string_view nonlinearity,
    c10::string_view exchange, int64_t team_blocks, int64_t teams, int64_t rows_per_tile) {
  auto launcher = make_v2_launcher(output, exchange, team_blocks, teams, rows_per_tile);
  return run_backward(launcher, grad_output, grad_h_n, output, W, h0, lengths, nonlinearity);
}

HostLauncher make_tc_launcher(const at::Tensor& x, c10::string_view exchange, int64_t team_blocks, int64_t teams,
                              int64_t rows_per_tile, int64_t kt) {
  TORCH_CHECK_VALUE(x.is_cpu(), "emulated_recurrence_tc: runs on CPU tensors, got ", x.device());
  TORCH_CHECK_VALUE(x.scalar_type() != at::kDouble, "emulated_recurrence_tc: tensor cores have no float64");
  TORCH_CHECK_VALUE(team_blocks >= 1 && teams >= 1, "emulated_recurrence_tc: team_blocks and teams must be >= 1, got ",
                    team_blocks, ", ", teams);
  TORCH_CHECK_VALUE(rows_per_tile >= kTcMmaN && rows_per_tile % kTcMmaN == 0,
                    "emulated_recurrence_tc: rows_per_tile must be a positive multiple of 8, got ", rows_per_tile);
  TORCH_CHECK_VALUE(kt == 1 || kt == 2, "emulated_recurrence_tc: kt must be 1 or 2, got ", kt);
  Plan p;
  p.persistent = true;
  p.version = 3;
  p.exchange = parse_exchange(exchange);
  TORCH_CHECK_VALUE(p.exchange != Exchange::Block || team_blocks == 1,
                    "emulated_recurrence_tc: the block exchange has one block per team, got ", team_blocks);
  p.col_groups = static_cast<int>(team_blocks);
  p.row_groups = static_cast<int>(teams);
  p.rows_per_tile = static_cast<int>(rows_per_tile);
  p.kt = static_cast<int>(kt);
  return {p};
}

std::tuple<at::Tensor, at::Tensor> emulated_forward_tc(const at::Tensor& x, const at::Tensor& W,
                                                       const std::optional<at::Tensor>& b,
                                                       const std::optional<at::Tensor>& h0,
                                                       const std::optional<at::Tensor>& lengths,
                                                       c10::string_view nonlinearity, c10::string_view exchange,
                                                       int64_t team_blocks, int64_t teams, int64_t rows_per_tile,
                                                       int64_t kt) {
  auto launcher = make_tc_launcher(x, exchange, team_blocks, teams, rows_per_tile, kt);
  return run_forward(launcher, x, W, b, h0, lengths, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulated_backward_tc(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output, const at::Tensor& W,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths, c10::string_view nonlinearity,
    c10::string_view exchange, int64_t team_blocks, int64_t teams, int64_t rows_per_tile, int64_t kt) {
  auto launcher = make_tc_launcher(output, exchange, team_blocks, teams, rows_per_tile, kt);
  return run_backward(launcher, grad_output, grad_h_n, output, W, h0, lengths, nonlinearity);
}

}  // namespace
}  // namespace nnrnn::kern

TORCH_LIBRARY_IMPL(nnrnn_fused, CPU, m) {
  m.impl("emulated_recurrence", &nnrnn::kern::emulated_forward);
  m.impl("emulated_recurrence_backward", &nnrnn::kern::emulated_backward);
  m.impl("emulated_recurrence_v2", &nnrnn::kern::emulated_forward_v2);
  m.impl("emulated_recurrence_v2_backward", &nnrnn::kern::emulated_backward_v2);
  m.impl("emulated_recurrence_tc", &nnrnn::kern::emulated_forward_tc);
  m.impl("emulated_recurrence_tc_backward", &nnrnn::kern::emulated_backward_tc);
}
