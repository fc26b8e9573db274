// Host side of the CUDA recurrence, shared by the CUDA op (recurrence_cuda.cu)
// and its host emulation (../cpu/emulated_cuda.cpp): argument checks, buffers,
// the persistent launch or the fallback loop, and the reductions after the
// backward's time loop. Only `Launcher` differs between the two:
//   Plan plan(int64_t B, int64_t N, at::ScalarType)       which path, which layout
//   at::Tensor lengths(const at::Tensor&, int64_t T)     validated int32 lengths on x's device
//   std::string persistent(const Body&, const Layout&, int threads, size_t shared_bytes)
//       "" when launched; else why the device refused the cooperative launch
//   void pointwise(const Body&, int64_t elements)
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <tuple>

#include "../checks.h"
#include "kernels.h"

namespace nnrnn::kern {

struct Plan {
  bool persistent = false;
  int col_groups = 1, row_groups = 1;  // the grid (the fallback's pointwise kernel: any)
  int threads = 1, rows_per_tile = 1;
  std::string reason;  // why the fallback, when it is taken
};

inline int64_t shared_bytes(const Layout& L, size_t acc_size) { return L.shared_elems() * static_cast<int64_t>(acc_size); }

constexpr int kMaxRowsPerTile = 64;  // rows of A staged per tile
constexpr int kMinRowsPerTile = 8;   // wanted beside W's slice (fewer: more block barriers per step)

// Shared memory of a persistent block, at most: its slice of W (N x cols), `rows` staged
// rows of A (N + 1 each) and the partial sums (at most `threads`), `acc` bytes each.
inline int64_t plan_bytes(int64_t N, int64_t cols, int64_t rows, int threads, int64_t acc) {
  return (N * cols + threads + rows * (N + 1 + cols)) * acc;
}

// The persistent layout on a device with `sms` multiprocessors and `budget` bytes
// of shared memory per block (one block per SM at most), or persistent = false
// and the reason. The fewest column groups whose slice of W fits beside a tile of
// rows (each block reads its rows of A from L2 every step: col_groups x B x N in
// all), then as many row groups as the SMs allow (less work per block). The CUDA
// side then checks occupancy (recurrence_cuda.cu).
inline Plan choose_persistent_plan(int64_t N, int64_t B, int64_t acc, int sms, int64_t budget, int threads) {
  Plan p;
  p.threads = threads;
  auto bytes_for = [&](int64_t cols, int64_t rows) { return plan_bytes(N, cols, rows, threads, acc); };
  for (int64_t c = 1; c <= std::min<int64_t>(N, sms); ++c) {
    const int64_t r = std::max<int64_t>(1, std::min<int64_t>(B, sms / c));
    const int64_t rows_per_block = (B + r - 1) / r;
    const int64_t cols = (N + c - 1) / c;
    if (bytes_for(cols, std::min<int64_t>(rows_per_block, kMinRowsPerTile)) > budget) continue;
    const int64_t fit = (budget - bytes_for(cols, 0)) / ((N + 1 + cols) * acc);
    p.persistent = true;
    p.col_groups = static_cast<int>(c);
    p.row_groups = static_cast<int>(r);
    p.rows_per_tile = static_cast<int>(std::min<int64_t>({rows_per_block, kMaxRowsPerTile, fit}));
    return p;
  }
  const int64_t cols = (N + sms - 1) / sms;
  p.reason = "W does not fit on chip: with " + std::to_string(sms) + " blocks a block's slice of W (" +
             std::to_string(N) + " x " + std::to_string(cols) + ") and a tile of rows need " +
             std::to_string(bytes_for(cols, 1)) + " bytes of shared memory or more, the device allows " +
             std::to_string(budget);
  return p;
}

// The layout forced by NNRNN_CUDA_PLAN="<col_groups>x<row_groups>" (benchmarks/gpu_check.sh
// times the grid barrier at chosen grid sizes this way); rows per tile as many as fit, up to
// the block's rows and kMaxRowsPerTile. A spec that is malformed or does not fit is an error.
inline Plan forced_persistent_plan(const std::string& spec, int64_t N, int64_t B, int64_t acc, int64_t budget,
                                   int threads) {
  int c = 0, r = 0, used = 0;
  const bool parsed = std::sscanf(spec.c_str(), "%dx%d%n", &c, &r, &used) == 2 && used == static_cast<int>(spec.size());
  TORCH_CHECK_VALUE(parsed && c >= 1 && r >= 1,
                    "NNRNN_CUDA_PLAN must be <col_groups>x<row_groups>, both >= 1 (e.g. 1x8), got '", spec, "'");
  const int64_t cols = (N + c - 1) / c;
  const int64_t fit = (budget - plan_bytes(N, cols, 0, threads, acc)) / ((N + 1 + cols) * acc);
  TORCH_CHECK_VALUE(fit >= 1, "NNRNN_CUDA_PLAN=", spec, ": a block's slice of W (", N, " x ", cols,
                    ") and one row of h need more than the ", budget, " bytes of shared memory a block may use");
  Plan p;
  p.persistent = true;
  p.threads = threads;
  p.col_groups = c;
  p.row_groups = r;
  p.rows_per_tile = static_cast<int>(std::min<int64_t>({std::max<int64_t>(1, (B + r - 1) / r), kMaxRowsPerTile, fit}));
  return p;
}

// NNRNN_CUDA_PLAN's layout when it is set, else the planner's.
inline Plan persistent_plan(int64_t N, int64_t B, int64_t acc, int sms, int64_t budget, int threads) {
  const char* spec = std::getenv("NNRNN_CUDA_PLAN");
  if (spec != nullptr && *spec != '\0') return forced_persistent_plan(spec, N, B, acc, budget, threads);
  return choose_persistent_plan(N, B, acc, sms, budget, threads);
}

// One launch of a persistent kernel Body over `a`, laid out by the plan, with its
// grid barrier's counter zeroed (stream-ordered, like everything else here).
// false, with a warning saying why, when the device refused the cooperative
// launch (MPS, SMs taken by others): the caller then runs the fallback, which
// needs no co-residency. Nothing was written then.
template <class Body, class Launcher, class Args>
bool launch_persistent(Launcher& launcher, Args& a, const Plan& plan, size_t acc_size,
                       const at::TensorOptions& options) {
  a.L = make_layout(a.L.T, a.L.B, a.L.N, plan.col_groups, plan.row_groups, plan.threads, plan.rows_per_tile);
  auto counter = at::zeros({1}, options.dtype(at::kLong));
  Body body{a, reinterpret_cast<unsigned long long*>(counter.data_ptr<int64_t>())};
  const std::string refused = launcher.persistent(body, a.L, plan.threads, shared_bytes(a.L, acc_size));
  if (refused.empty()) return true;
  TORCH_WARN("fused_nnrnn: the device refused the cooperative launch of the persistent kernel (", refused,
             "); this call and later ones of this shape take the fallback path (a GEMM per step) instead; "
             "nnrnn_fused.cuda_path() says so");
  return false;
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor> run_forward(Launcher& launcher, const at::Tensor& x, const at::Tensor& W,
                                               const std::optional<at::Tensor>& b,
                                               const std::optional<at::Tensor>& h0,
                                               const std::optional<at::Tensor>& lengths,
                                               c10::string_view nonlinearity) {
  const Nonlinearity f = parse_nonlinearity(nonlinearity);
  const Sizes s = check_forward_inputs(x, W, b, h0, lengths);
  const int64_t T = s.T, B = s.B, N = s.N;
  TORCH_CHECK_VALUE(T < (int64_t{1} << 31), "fused_nnrnn: CUDA kernels support T < 2^31, got T = ", T);
  const at::Tensor len = lengths ? launcher.lengths(*lengths, T) : at::Tensor();
  auto out = at::empty({T, B, N}, x.options());
  if (T == 0 || B == 0 || N == 0) return {out, h0 ? h0->clone() : at::zeros({B, N}, x.options())};  // out is empty
  const Plan plan = launcher.plan(B, N, x.scalar_type());
  at::Tensor h_n;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nnrnn_recurrence_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto xc = x.contiguous(), Wc = W.contiguous();
    auto bc = b ? b->contiguous() : at::Tensor();
    auto h0c = h0 ? h0->contiguous() : at::Tensor();
    auto state = at::empty({2, B, N}, acc);
    ForwardArgs<scalar_t, acc_t> a{xc.data_ptr<scalar_t>(),
                                   Wc.data_ptr<scalar_t>(),
                                   b ? bc.data_ptr<scalar_t>() : nullptr,
                                   h0 ? h0c.data_ptr<scalar_t>() : nullptr,
                                   len.defined() ? len.data_ptr<int32_t>() : nullptr,
                                   out.data_ptr<scalar_t>(),
                                   state.data_ptr<acc_t>(),
                                   Layout{T, B, N, 1, 1, 0, 0, 1},
                                   f};
    if (!plan.persistent ||
        !launch_persistent<PersistentForward<scalar_t, acc_t>>(launcher, a, plan, sizeof(acc_t), x.options())) {
      // A GEMM per step into `dots`, then the pointwise finish.
      auto W_acc = Wc.to(acc.dtype());
      auto h0_acc = h0 ? h0c.to(acc.dtype()) : at::Tensor();
      auto dots = at::empty({B, N}, acc);
      for (int64_t t = 0; t < T; ++t) {
        if (!a.zero_prev(t)) at::mm_out(dots, t == 0 ? h0_acc : state[(t - 1) & 1], W_acc);
        launcher.pointwise(PointwiseStep<ForwardArgs<scalar_t, acc_t>, acc_t>{
                               a, a.zero_prev(t) ? nullptr : dots.data_ptr<acc_t>(), t},
                           B * N);
      }
    }
    h_n = state[(T - 1) & 1].to(x.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
  });
  return {out, h_n};
}

template <class Launcher>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_backward(
    Launcher& launcher, const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& W, const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths,
    c10::string_view nonlinearity) {
  const Nonlinearity f = parse_nonlinearity(nonlinearity);
  const Sizes s = check_backward_inputs(grad_output, grad_h_n, output, W, h0, lengths);
  const int64_t T = s.T, B = s.B, N = s.N;
  TORCH_CHECK_VALUE(T < (int64_t{1} << 31), "fused_nnrnn: CUDA kernels support T < 2^31, got T = ", T);
  const at::Tensor len = lengths ? launcher.lengths(*lengths, T) : at::Tensor();
  auto dW = at::zeros({N, N}, W.options());
  if (T == 0 || B == 0 || N == 0)
    return {at::zeros_like(output), dW, at::zeros({N}, W.options()), grad_h_n.clone()};

  const Plan plan = launcher.plan(B, N, output.scalar_type());
  auto out = output.contiguous();
  auto dx = at::empty_like(out);
  auto grad_h0 = at::empty({B, N}, output.options());
  at::Tensor db_rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, output.scalar_type(), "nnrnn_recurrence_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = output.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto go = grad_output.contiguous(), Wc = W.contiguous();
    auto g = grad_h_n.to(acc.dtype(), /*non_blocking=*/false, /*copy=*/true).contiguous();
    auto da = at::empty({2, B, N}, acc);
    db_rows = at::zeros({B, N}, acc);
    BackwardArgs<scalar_t, acc_t> a{go.data_ptr<scalar_t>(),
                                    out.data_ptr<scalar_t>(),
                                    Wc.data_ptr<scalar_t>(),
                                    len.defined() ? len.data_ptr<int32_t>() : nullptr,
                                    g.data_ptr<acc_t>(),
                                    da.data_ptr<acc_t>(),
                                    dx.data_ptr<scalar_t>(),
                                    db_rows.data_ptr<acc_t>(),
                                    grad_h0.data_ptr<scalar_t>(),
                                    Layout{T, B, N, 1, 1, 0, 0, 1},
                                    f};
    if (!plan.persistent ||
        !launch_persistent<PersistentBackward<scalar_t, acc_t>>(launcher, a, plan, sizeof(acc_t), output.options())) {
      using Step = PointwiseStep<BackwardArgs<scalar_t, acc_t>, acc_t>;
      auto W_acc = Wc.to(acc.dtype());
      auto dots = at::empty({B, N}, acc);
      launcher.pointwise(Step{a, nullptr, T}, B * N);  // da_{T-1} from grad_h_n
      for (int64_t t = T - 1; t >= 0; --t) {
        at::mm_out(dots, da[t & 1], W_acc.t());
        launcher.pointwise(Step{a, dots.data_ptr<acc_t>(), t}, B * N);
      }
    }
  });

  // dW = sum_t h_{t-1}^T da_t as GEMMs over all steps: h_{t-1} is out[t-1] for
  // t >= 1 and h0 for t = 0 (where a sequence has finished, da_t is zero).
  if (T > 1) at::mm_out(dW, out.narrow(0, 0, T - 1).reshape({-1, N}).t(), dx.narrow(0, 1, T - 1).reshape({-1, N}));
  if (h0) dW.addmm_(h0->t(), dx[0]);
  auto db = db_rows.sum(0).to(output.scalar_type());
  return {dx, dW, db, grad_h0};
}

}  // namespace nnrnn::kern
