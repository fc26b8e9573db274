// One RMSprop step over a whole parameter group in one call (nnrnn_fused.optim.RMSprop).
//
// torch.optim.RMSprop runs five to eight small tensor operations per parameter, plus Python
// between them; for the few small parameters of an nnRNN (a copy-task model has eight, 35K
// numbers) that per-call cost is several percent of a training step on the CPU. Here each
// element goes once through torch's arithmetic, in torch's order of operations:
//   g   = (maximize ? -grad : grad) + weight_decay * p
//   v   = alpha * v + (1 - alpha) * g * g
//   avg = sqrt(v - g_avg^2) + eps, g_avg = lerp(g_avg, g, 1 - alpha)    (centered)
//   avg = sqrt(v) + eps                                                (otherwise)
//   p  -= lr * buf, buf = momentum * buf + g / avg                     (momentum > 0)
//   p  -= lr * g / avg                                                 (otherwise)
// The results are not torch's to the bit: torch's sqrt of a float tensor (MKL's vector math
// where torch has it) is not always correctly rounded, and its AVX2/AVX-512 kernels fuse some of
// the multiply-adds; each costs at most an ulp or so per step (tests/test_optim.py).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>

namespace nnrnn {
namespace {

struct Hyper {
  double lr, alpha, eps, weight_decay, momentum;
  bool maximize;
};

template <typename T>
struct Group {
  T* p;
  const T* grad;
  T* v;
  T* g_avg;
  T* buf;
  int64_t n;
};

// One loop for each combination of options, without branches, over restrict pointers: it vectorizes.
template <typename T, bool kDecay, bool kCentered, bool kMomentum>
void rmsprop_loop(const Group<T>& t, const Hyper& h) {
  T* __restrict__ p = t.p;
  const T* __restrict__ grad = t.grad;
  T* __restrict__ v = t.v;
  T* __restrict__ g_avg = t.g_avg;
  T* __restrict__ buf = t.buf;
  // The coefficients rounded to T once, as torch's kernels take their scalars.
  const T alpha = h.alpha, one_minus_alpha = 1 - h.alpha, eps = h.eps, wd = h.weight_decay;
  const T momentum = h.momentum, minus_lr = -h.lr, sign = h.maximize ? -1 : 1;
  const bool lerp_low = std::abs(one_minus_alpha) < T(0.5);  // torch's lerp has two formulas
  for (int64_t i = 0; i < t.n; ++i) {
    T g = sign * grad[i];
    if constexpr (kDecay) g = g + wd * p[i];
    v[i] = v[i] * alpha + one_minus_alpha * g * g;
    T avg;
    if constexpr (kCentered) {
      g_avg[i] = lerp_low ? g_avg[i] + one_minus_alpha * (g - g_avg[i]) : g - (g - g_avg[i]) * (1 - one_minus_alpha);
      avg = std::sqrt(v[i] - g_avg[i] * g_avg[i]) + eps;
    } else {
      avg = std::sqrt(v[i]) + eps;
    }
    if constexpr (kMomentum) {
      buf[i] = buf[i] * momentum + g / avg;
      p[i] = p[i] + minus_lr * buf[i];
    } else {
      p[i] = p[i] + minus_lr * g / avg;
    }
  }
}

template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T>
void rmsprop_group(const Group<T>& t, const Hyper& h) {
  with_flag(h.weight_decay != 0, [&](auto decay) {
    with_flag(t.g_avg != nullptr, [&](auto centered) {
      with_flag(t.buf != nullptr, [&](auto momentum) { rmsprop_loop<T, decay, centered, momentum>(t, h); });
    });
  });
}

void check_like(const at::Tensor& t, const at::Tensor& p, const char* name, size_t i) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.scalar_type() == p.scalar_type() && t.is_contiguous() &&
                        t.numel() == p.numel(),
                    "rmsprop_step_: ", name, "[", i, "] must be a contiguous CPU tensor of ", p.scalar_type(),
                    " with ", p.numel(), " elements like params[", i, "], got ", t.scalar_type(), " on ",
                    t.device(), " with ", t.numel(), t.is_contiguous() ? "" : " (not contiguous)");
}

void rmsprop_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                      at::TensorList grad_avgs, at::TensorList momentum_buffers, at::TensorList steps,
                      double lr, double alpha, double eps, double weight_decay, double momentum,
                      bool centered, bool maximize) {
  const size_t n = params.size();
  TORCH_CHECK_VALUE(grads.size() == n && square_avgs.size() == n && steps.size() == n,
                    "rmsprop_step_: params, grads, square_avgs and steps must be as many, got ", n, ", ",
                    grads.size(), ", ", square_avgs.size(), ", ", steps.size());
  TORCH_CHECK_VALUE(grad_avgs.size() == (centered ? n : 0),
                    "rmsprop_step_: grad_avgs must hold one tensor per parameter when centered, none otherwise");
  TORCH_CHECK_VALUE(momentum_buffers.size() == (momentum > 0 ? n : 0),
                    "rmsprop_step_: momentum_buffers must hold one tensor per parameter when momentum > 0, "
                    "none otherwise");
  for (const auto i : c10::irange(n)) {
    const at::Tensor& p = params[i];
    TORCH_CHECK_VALUE(p.device().is_cpu() && p.is_contiguous() &&
                          (p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble),
                      "rmsprop_step_: params[", i, "] must be a contiguous float32 or float64 CPU tensor, got ",
                      p.scalar_type(), " on ", p.device());
    check_like(grads[i], p, "grads", i);
    check_like(square_avgs[i], p, "square_avgs", i);
    if (centered) check_like(grad_avgs[i], p, "grad_avgs", i);
    if (momentum > 0) check_like(momentum_buffers[i], p, "momentum_buffers", i);
    TORCH_CHECK_VALUE(steps[i].device().is_cpu() && steps[i].numel() == 1 && steps[i].is_floating_point(),
                      "rmsprop_step_: steps[", i, "] must be a floating-point CPU scalar tensor");
  }
  const Hyper h{lr, alpha, eps, weight_decay, momentum, maximize};
  for (const auto i : c10::irange(n)) {
    AT_DISPATCH_FLOATING_TYPES(params[i].scalar_type(), "rmsprop_step_", [&] {
      rmsprop_group<scalar_t>({params[i].data_ptr<scalar_t>(), grads[i].const_data_ptr<scalar_t>(),
                               square_avgs[i].data_ptr<scalar_t>(),
                               centered ? grad_avgs[i].data_ptr<scalar_t>() : nullptr,
                               momentum > 0 ? momentum_buffers[i].data_ptr<scalar_t>() : nullptr,
                               params[i].numel()},
                              h);
    });
    steps[i].add_(1);
  }
}

}  // namespace
}  // namespace nnrnn

TORCH_LIBRARY_FRAGMENT(nnrnn_fused, m) {
  m.def(
      "rmsprop_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] square_avgs, Tensor(c!)[] grad_avgs,"
      " Tensor(d!)[] momentum_buffers, Tensor(e!)[] steps, float lr, float alpha, float eps,"
      " float weight_decay, float momentum, bool centered, bool maximize) -> ()");
}

TORCH_LIBRARY_IMPL(nnrnn_fused, CPU, m) { m.impl("rmsprop_step_", &nnrnn::rmsprop_step_cpu); }
