// Host side of the CUDA recurrence, shared by the CUDA op (recurrence_cuda.cu)
// and its host emulation (../cpu/emulated_cuda.cpp): argument checks, buffers,
// the persistent launch or the fallback loop, and the reductions after the
// backward's time loop. Only `Launcher` differs between the two:
//   Plan plan(int64_t B, int64_t N, at::ScalarType)       which path, which layout
//   at::Tensor lengths(const at::Tensor&, int64_t T)     validated int32 lengths on x's device
//   std::string persistent(const Body&, const Layout&, int threads, size_t shared_bytes)   kernel v1
//   std::string team(const Body&, const LayoutV2&, size_t shared_bytes)                    kernel v2
//       "" when launched; else why the device refused the cooperative or cluster launch
//   template <typename acc_t> using V2Shape = TileShape<KT, CT, LANES>                    v2's register tile
//   std::string tc(const Body&, const TcLayout&)                                  the tensor-core path (as team)
//   using TcKts = KtList<...>                                                     its kernels' KT values
//   static constexpr bool kHostEmulation                                         float16/bfloat16 on CPU tensors
//   void pointwise(const Body&, int64_t elements)
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>

#include "../checks.h"
#include "kernels.h"
#include "kernels_v2.h"
#include "plan.h"
#include "tc_plan.h"

namespace nnrnn::kern {

inline int64_t shared_bytes(const Layout& L, size_t acc_size) { return L.shared_elems() * static_cast<int64_t>(acc_size); }

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

// One launch of kernel v2 for Problem `a` (ForwardV2 or BackwardV2), laid out by
// the plan with the launcher's tile shape; Grid's step counters zeroed.
// false, with the same warning as launch_persistent, when the device refused the
// cluster or cooperative launch.
template <class Launcher, class Problem>
bool launch_v2(Launcher& launcher, Problem& a, const Plan& plan, const at::TensorOptions& options) {
  using Shape = typename Launcher::template V2Shape<typename Problem::acc_t>;
  a.L = v2_layout(a.L.T, a.L.B, a.L.N, plan, Shape::KT, Shape::CT, Shape::LANES);
  a.L.derive(sizeof(typename Problem::acc_t));
  TORCH_CHECK(plan.col_groups <= a.L.N && plan.row_groups <= a.L.B &&
                  static_cast<int64_t>(plan.rows_per_tile) * a.L.max_cols() <= a.L.threads(),
              "fused_nnrnn: invalid kernel v2 layout (", plan.row_groups, " teams x ", plan.col_groups,
              " blocks, ", plan.rows_per_tile, " rows per tile) for B = ", a.L.B, ", N = ", a.L.N);
  auto flags = at::zeros({a.L.grid()}, options.dtype(at::kLong));
  a.flags = reinterpret_cast<unsigned long long*>(flags.template data_ptr<int64_t>());
  const size_t bytes = a.L.shared_bytes(sizeof(typename Problem::acc_t));
  std::string refused;
  switch (plan.exchange) {
    case Exchange::Block:
      refused = launcher.team(TeamKernel<Shape, Problem, Exchange::Block>{a}, a.L, bytes);
      break;
    case Exchange::Cluster:
      refused = launcher.team(TeamKernel<Shape, Problem, Exchange::Cluster>{a}, a.L, bytes);
      break;
    case Exchange::Grid:
      refused = launcher.team(TeamKernel<Shape, Problem, Exchange::Grid>{a}, a.L, bytes);
      break;
  }
  if (refused.empty()) return true;
  TORCH_WARN("fused_nnrnn: the device refused the launch of persistent kernel v2 (", refused,
             "); this call and later ones of this shape take the fallback path (a GEMM per step) instead; "
             "nnrnn_fused.cuda_path() says so");
  return false;
}

// The tensor-core path's operands for a scalar type: float16, bfloat16, TF32 (float32).
template <typename scalar_t>
constexpr MmaKind tc_kind() {
  return std::is_same<scalar_t, at::Half>::value ? MmaKind::F16
         : std::is_same<scalar_t, at::BFloat16>::value ? MmaKind::BF16 : MmaKind::TF32;
}

template <int... KTs>
struct KtList {};

template <MmaKind kind, class Problem, class Launcher, int KT, int... Rest>
std::string launch_tc_kt(Launcher& launcher, const Problem& a, const TcLayout& L,
                         typename OperandPair<kind>::type* grid_operands, KtList<KT, Rest...>) {
  if (L.kt == KT) {
    switch (L.exchange) {
      case Exchange::Block:
        return launcher.tc(TcTeamKernel<kind, KT, Problem, Exchange::Block>{a, L}, L);
      case Exchange::Cluster:
        return launcher.tc(TcTeamKernel<kind, KT, Problem, Exchange::Cluster>{a, L}, L);
      case Exchange::Grid:
        return launcher.tc(TcTeamKernel<kind, KT, Problem, Exchange::Grid>{a, L, grid_operands}, L);
    }
  }
  if constexpr (sizeof...(Rest) > 0) {
    return launch_tc_kt<kind>(launcher, a, L, grid_operands, KtList<Rest...>{});
  } else {
    TORCH_CHECK(false, "fused_nnrnn: no tensor-core kernel with KT = ", L.kt);
  }
}

// One launch of the tensor-core path (tc_kernels.h) for Problem `a` (ForwardV2 or
// BackwardV2 with float32 accumulation), laid out by the plan; Grid's step counters
// zeroed. false, with the same warning as launch_v2, when the device refused the
// cluster or cooperative launch.
template <typename scalar_t, class Launcher, class Problem>
bool launch_tc(Launcher& launcher, Problem& a, const Plan& plan, const at::TensorOptions& options) {
  const int64_t B = a.L.B, N = a.L.N;
  const TcLayout L = tc_layout(a.L.T, B, N, plan.exchange, plan.col_groups, plan.row_groups, plan.rows_per_tile,
                               plan.kt, tc_kind<scalar_t>());
  TORCH_CHECK(2 * static_cast<int64_t>(plan.col_groups) <= N + 1 && plan.row_groups <= B &&
                  plan.rows_per_tile >= kTcMmaN && plan.rows_per_tile % kTcMmaN == 0 &&
                  (plan.exchange != Exchange::Block || plan.col_groups == 1),
              "fused_nnrnn: invalid tensor-core layout (", plan.row_groups, " teams x ", plan.col_groups,
              " blocks, ", plan.rows_per_tile, " rows per tile) for B = ", B, ", N = ", N);
  auto flags = at::zeros({L.grid()}, options.dtype(at::kLong));
  a.flags = reinterpret_cast<unsigned long long*>(flags.template data_ptr<int64_t>());
  // Grid: A_m in the operand type (every pair written before it is read: not zeroed).
  using pair_t = typename OperandPair<tc_kind<scalar_t>()>::type;
  at::Tensor operands;
  if (L.exchange == Exchange::Grid)
    operands = at::empty({2 * B * L.row_pairs() * static_cast<int64_t>(sizeof(pair_t))}, options.dtype(at::kByte));
  auto* grid_operands = operands.defined() ? reinterpret_cast<pair_t*>(operands.data_ptr()) : nullptr;
  const std::string refused =
      launch_tc_kt<tc_kind<scalar_t>()>(launcher, a, L, grid_operands, typename Launcher::TcKts{});
  if (refused.empty()) return true;
  TORCH_WARN("fused_nnrnn: the device refused the launch of the tensor-core kernel (", refused,
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
  const Sizes s = check_forward_inputs(x, W, b, h0, lengths, Launcher::kHostEmulation);
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
    bool launched = false;
    if (plan.persistent && plan.version == 3) {
      if constexpr (std::is_same<acc_t, float>::value) {  // float16, bfloat16, float32 (TF32)
        ForwardV2<scalar_t, float> a3{a.x,   a.W,       a.bias,  a.h0, a.lengths, a.out, a.state,
                                      nullptr, LayoutV2{T, B, N, Exchange::Block, 1, 1, 1, 1, 1, 1, {}}, f};
        launched = launch_tc<scalar_t>(launcher, a3, plan, x.options());
      } else {
        TORCH_CHECK(false, "fused_nnrnn: the tensor-core path has no float64, got ", x.scalar_type());
      }
    } else if (plan.persistent && plan.version == 2) {
      if constexpr (std::is_same<scalar_t, acc_t>::value) {  // float32, float64
        ForwardV2<scalar_t, acc_t> a2{a.x,   a.W,       a.bias,  a.h0, a.lengths, a.out, a.state,
                                      nullptr, LayoutV2{T, B, N, Exchange::Block, 1, 1, 1, 1, 1, 1, {}}, f};
        launched = launch_v2(launcher, a2, plan, x.options());
      } else {
        TORCH_CHECK(false, "fused_nnrnn: kernel v2 runs float32 and float64 only, got ", x.scalar_type());
      }
    } else if (plan.persistent) {
      launched = launch_persistent<PersistentForward<scalar_t, acc_t>>(launcher, a, plan, sizeof(acc_t), x.options());
    }
    if (!launched) {
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
  const Sizes s = check_backward_inputs(grad_output, grad_h_n, output, W, h0, lengths, Launcher::kHostEmulation);
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
    bool launched = false;
    if (plan.persistent && plan.version == 3) {
      if constexpr (std::is_same<acc_t, float>::value) {  // float16, bfloat16, float32 (TF32)
        auto ghn = grad_h_n.contiguous();
        BackwardV2<scalar_t, float> a3{a.grad_out, a.out,     a.W,       a.lengths, ghn.data_ptr<scalar_t>(),
                                       a.g,        a.da,      a.dx,      a.db_rows, a.grad_h0,
                                       nullptr,    LayoutV2{T, B, N, Exchange::Block, 1, 1, 1, 1, 1, 1, {}}, f};
        launched = launch_tc<scalar_t>(launcher, a3, plan, output.options());
      } else {
        TORCH_CHECK(false, "fused_nnrnn: the tensor-core path has no float64, got ", output.scalar_type());
      }
    } else if (plan.persistent && plan.version == 2) {
      if constexpr (std::is_same<scalar_t, acc_t>::value) {  // float32, float64
        auto ghn = grad_h_n.contiguous();
        BackwardV2<scalar_t, acc_t> a2{a.grad_out, a.out,     a.W,       a.lengths, ghn.data_ptr<scalar_t>(),
                                       a.g,        a.da,      a.dx,      a.db_rows, a.grad_h0,
                                       nullptr,    LayoutV2{T, B, N, Exchange::Block, 1, 1, 1, 1, 1, 1, {}}, f};
        launched = launch_v2(launcher, a2, plan, output.options());
      } else {
        TORCH_CHECK(false, "fused_nnrnn: kernel v2 runs float32 and float64 only, got ", output.scalar_type());
      }
    } else if (plan.persistent) {
      launched =
          launch_persistent<PersistentBackward<scalar_t, acc_t>>(launcher, a, plan, sizeof(acc_t), output.options());
    }
    if (!launched) {
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
