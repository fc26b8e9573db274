// CPU kernels of nnrnn_fused::recurrence and recurrence_backward.
//
// Two paths, chosen per shape by choose_cpu_path (packed.h): the packed kernels
// (packed_kernels.h: W packed once, batch slices or a team of threads in lockstep,
// the nonlinearity in the micro-kernel's epilogue), and the BLAS path below. In the
// BLAS path each direction is one call that loops over the timesteps in C++: per
// step one small GEMM on raw pointers (blas.h) with the nonlinearity applied right
// after it, while the step's rows are still in cache; the batch split into slices
// of rows that run on threads of their own where W is small enough (packed_cpu.cpp).
// No tensor is created inside the time loop. The weight gradient is one GEMM over
// all steps after the loop.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../activation.h"
#include "../checks.h"
#include "blas.h"
#include "block_cache.h"
#include "packed.h"

namespace nnrnn::cpu {
namespace {

template <typename T>
StridedMatrix<T> strided(const at::Tensor& W) {
  return {W.data_ptr<T>(), W.stride(0), W.stride(1)};
}

// Rows of a step are independent in the pointwise pass; split them over threads
// only when there is enough work to pay for it (and only with a single batch
// slice: inside a slice's thread at::parallel_for runs inline).
constexpr int64_t kPointwiseGrain = 1 << 15;

template <typename F>
void for_rows(int64_t first, int64_t end, int64_t N, const F& body) {
  const int64_t grain = std::max<int64_t>(1, kPointwiseGrain / std::max<int64_t>(N, 1));
  at::parallel_for(first, end, grain, [&](int64_t begin, int64_t stop) {
    for (int64_t r = begin; r < stop; ++r) body(r);
  });
}

// Runs body(first_row, end_row) for each of `slices` blocks of consecutive rows,
// spread over the threads: every block runs its whole time loop on one thread, its
// GEMMs single-threaded (MKL, and OpenBLAS built with OpenMP, do not fork inside a
// parallel region). With one slice the body runs on the calling thread and each
// GEMM uses all threads.
template <typename Body>
void for_slices(int64_t B, int64_t slices, const Body& body) {
  at::parallel_for(0, slices, 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) body(B * s / slices, B * (s + 1) / slices);
  });
}

// The pointwise loops over one row, compiled for AVX-512, AVX2 and the baseline and
// chosen at load time (GCC's target_clones, glibc's ifunc): the baseline SSE2 build
// left modReLU and tanh scalar.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define NNRNN_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define NNRNN_ISA_CLONES
#endif

template <typename scalar_t, Nonlinearity F>
NNRNN_ISA_CLONES void activate_row(scalar_t* z, const scalar_t* b, int64_t N) {
  for (int64_t j = 0; j < N; ++j) z[j] = activate<scalar_t>(F, z[j], b[j]);
}

// da = (g + go) phi'(a) from the output h; db accumulates da times dh/db / dh/dz.
template <typename scalar_t, Nonlinearity F>
NNRNN_ISA_CLONES void derivative_row(const scalar_t* g, const scalar_t* go, const scalar_t* h, scalar_t* da,
                                     double* db, int64_t N) {
  for (int64_t j = 0; j < N; ++j) {
    const scalar_t d = (g[j] + go[j]) * derivative_from_output<scalar_t>(F, h[j]);
    da[j] = d;
    db[j] += static_cast<double>(d * bias_factor_from_output<scalar_t>(F, h[j]));
  }
}

// Calls fn(std::integral_constant<Nonlinearity, f>{}): the time loops are compiled
// once per nonlinearity, so the pointwise loops carry no switch and vectorize.
template <typename Fn>
void with_nonlinearity(Nonlinearity f, Fn&& fn) {
  switch (f) {
    case Nonlinearity::ModReLU: return fn(std::integral_constant<Nonlinearity, Nonlinearity::ModReLU>{});
    case Nonlinearity::Tanh: return fn(std::integral_constant<Nonlinearity, Nonlinearity::Tanh>{});
    case Nonlinearity::ReLU: return fn(std::integral_constant<Nonlinearity, Nonlinearity::ReLU>{});
  }
}

// Per-sequence lengths as int64 on the CPU, or empty when all sequences run T steps.
std::vector<int64_t> lengths_vector(const std::optional<at::Tensor>& lengths, int64_t T) {
  if (!lengths) return {};
  TORCH_CHECK_VALUE(lengths->is_cpu(), "fused_nnrnn: lengths must be on the CPU for CPU inputs");
  check_length_values(*lengths, T);
  auto l = lengths->to(at::kLong).contiguous();
  return std::vector<int64_t>(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + l.numel());
}

// h_n with lengths on the packed path: each row's output at its last step, or its
// initial state where its length is 0.
at::Tensor last_states(const at::Tensor& out, const std::vector<int64_t>& len, const at::Tensor& initial) {
  const int64_t B = out.size(1), N = out.size(2);
  std::vector<int64_t> rows, steps;
  for (int64_t r = 0; r < B; ++r) {
    if (len[r] > 0) {
      rows.push_back(r);
      steps.push_back((len[r] - 1) * B + r);
    }
  }
  auto h_n = initial.clone(at::MemoryFormat::Contiguous);
  if (!rows.empty()) {
    h_n.index_copy_(0, at::tensor(rows), out.view({-1, N}).index_select(0, at::tensor(steps)));
  }
  return h_n;
}

template <typename scalar_t, Nonlinearity F>
void forward_loop(int64_t T, int64_t B, int64_t N, int64_t slices, const scalar_t* W, const scalar_t* b,
                  const scalar_t* h0, const std::vector<int64_t>& len, scalar_t* out, scalar_t* state) {
  // out holds x on entry. Without lengths the state of step t is out[t]; with
  // lengths it lives in `state`, because finished rows keep it while their
  // output is zero.
  const int64_t step = B * N;
  for_slices(B, slices, [&](int64_t first, int64_t end) {
    const int64_t offset = first * N;
    const scalar_t* prev = h0 ? h0 + offset : nullptr;  // nullptr: zero state, no GEMM needed
    for (int64_t t = 0; t < T; ++t) {
      scalar_t* cur = out + t * step + offset;
      if (prev) gemm_rowmajor<scalar_t>(end - first, N, N, prev, W, /*transpose_b=*/false, /*accumulate=*/true, cur);
      for_rows(first, end, N, [&](int64_t r) {
        scalar_t* z = out + t * step + r * N;
        if (!len.empty() && t >= len[r]) {
          std::fill(z, z + N, scalar_t(0));
          return;
        }
        activate_row<scalar_t, F>(z, b, N);
        if (!len.empty()) std::copy(z, z + N, state + r * N);
      });
      prev = len.empty() ? cur : state + offset;
    }
  });
}

std::tuple<at::Tensor, at::Tensor> recurrence_cpu(const at::Tensor& x, const at::Tensor& W,
                                                  const std::optional<at::Tensor>& b,
                                                  const std::optional<at::Tensor>& h0,
                                                  const std::optional<at::Tensor>& lengths,
                                                  c10::string_view nonlinearity) {
  const auto f = parse_nonlinearity(nonlinearity);
  const Sizes s = check_forward_inputs(x, W, b, h0, lengths);
  const int64_t T = s.T, B = s.B, N = s.N;
  const auto len = lengths_vector(lengths, T);

  const CpuPath path = choose_cpu_path(N, B, x.scalar_type());
  const bool packed = path.packed;
  // The BLAS loop adds each step's product to x in place; the packed kernels read x.
  auto xc = packed ? x.contiguous() : at::Tensor();
  auto out = empty_from_cache({T, B, N}, x.scalar_type());
  if (!packed) out.copy_(x);
  auto Wc = packed ? at::Tensor() : W.contiguous();  // the packed kernels read W by its strides
  auto bc = b ? b->contiguous() : at::zeros({N}, x.options());
  auto h0c = h0 ? h0->contiguous() : at::Tensor();
  // With lengths the BLAS loop keeps the running state in h_n itself; start it from h0.
  auto state = len.empty() || packed ? at::Tensor() : (h0 ? h0c.clone() : at::zeros({B, N}, x.options()));

  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nnrnn_recurrence_cpu", [&] {
    const scalar_t* h0p = h0 ? h0c.data_ptr<scalar_t>() : nullptr;
    if (packed) {
      packed_forward<scalar_t>(T, B, N, path.slices, xc.data_ptr<scalar_t>(), strided<scalar_t>(W),
                               bc.data_ptr<scalar_t>(), h0p, len, f, out.data_ptr<scalar_t>());
      return;
    }
    with_nonlinearity(f, [&](auto fc) {
      forward_loop<scalar_t, decltype(fc)::value>(
          T, B, N, path.slices, Wc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), h0p, len, out.data_ptr<scalar_t>(),
          state.defined() ? state.data_ptr<scalar_t>() : nullptr);
    });
  });

  at::Tensor h_n;
  if (!len.empty()) {
    h_n = packed ? last_states(out, len, h0 ? h0c : at::zeros({B, N}, x.options())) : state;
  } else if (T > 0) {
    h_n = out[T - 1].clone();
  } else {
    h_n = h0 ? h0c.clone() : at::zeros({B, N}, x.options());
  }
  return {out, h_n};
}

template <typename scalar_t, Nonlinearity F>
void backward_loop(int64_t T, int64_t B, int64_t N, int64_t slices, const scalar_t* Wt, const scalar_t* out,
                   const scalar_t* grad_out, const std::vector<int64_t>& len, scalar_t* g, scalar_t* g_next,
                   scalar_t* dx, double* db_rows) {
  // g holds dL/dh_t for the step being processed (starting from grad_h_n); the
  // output gradient of step t joins it before the derivative is applied.
  // db_rows (B, N) accumulates the bias gradient per row, summed after the loop,
  // so that threads never share an accumulator (deterministic). Wt is W^T,
  // contiguous: a GEMM on a transposed operand was slower (single-threaded,
  // 50 x 512 x 512: 277-299 µs against 236-246).
  const int64_t step = B * N;
  for_slices(B, slices, [&](int64_t first, int64_t end) {
    const int64_t offset = first * N;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t at_t = t * step;
      for_rows(first, end, N, [&](int64_t r) {
        const int64_t o = at_t + r * N;
        if (!len.empty() && t >= len[r]) {  // finished: the state, and g, pass through
          std::fill(dx + o, dx + o + N, scalar_t(0));
          return;
        }
        derivative_row<scalar_t, F>(g + r * N, grad_out + o, out + o, dx + o, db_rows + r * N, N);
      });
      scalar_t* da = dx + at_t + offset;
      if (len.empty()) {
        gemm_rowmajor<scalar_t>(end - first, N, N, da, Wt, /*transpose_b=*/false, /*accumulate=*/false, g + offset);
      } else {
        gemm_rowmajor<scalar_t>(end - first, N, N, da, Wt, /*transpose_b=*/false, /*accumulate=*/false,
                                g_next + offset);
        for (int64_t r = first; r < end; ++r) {
          if (t < len[r]) std::copy(g_next + r * N, g_next + (r + 1) * N, g + r * N);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output,
    const at::Tensor& W, const std::optional<at::Tensor>& h0,
    const std::optional<at::Tensor>& lengths, c10::string_view nonlinearity) {
  const auto f = parse_nonlinearity(nonlinearity);
  const Sizes s = check_backward_inputs(grad_output, grad_h_n, output, W, h0, lengths);
  const int64_t T = s.T, B = s.B, N = s.N;
  const auto len = lengths_vector(lengths, T);

  auto out = output.contiguous();
  auto go = grad_output.contiguous();
  const CpuPath path = choose_cpu_path(N, B, output.scalar_type());
  if (path.packed) {
    auto dx = empty_from_cache(out.sizes(), out.scalar_type());
    auto dW = at::empty({N, N}, out.options());
    auto db = at::empty({N}, out.options().dtype(at::kDouble));
    auto grad_h0 = at::empty({B, N}, out.options());
    auto gh = grad_h_n.contiguous();
    auto h0c = h0 ? h0->contiguous() : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "nnrnn_recurrence_backward_cpu", [&] {
      packed_backward<scalar_t>(T, B, N, path.slices, strided<scalar_t>(W), out.data_ptr<scalar_t>(),
                                go.data_ptr<scalar_t>(), gh.data_ptr<scalar_t>(),
                                h0 ? h0c.data_ptr<scalar_t>() : nullptr, len, f,
                                dx.data_ptr<scalar_t>(), dW.data_ptr<scalar_t>(), db.data_ptr<double>(),
                                grad_h0.data_ptr<scalar_t>());
    });
    return {dx, dW, db.to(output.scalar_type()), grad_h0};
  }
  auto g = grad_h_n.clone(at::MemoryFormat::Contiguous);
  auto Wt = W.t().contiguous();
  auto g_next = len.empty() ? at::Tensor() : at::empty_like(g);
  auto dx = empty_from_cache(out.sizes(), out.scalar_type());
  auto db_rows = at::zeros({B, N}, output.options().dtype(at::kDouble));

  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "nnrnn_recurrence_backward_cpu", [&] {
    with_nonlinearity(f, [&](auto fc) {
      backward_loop<scalar_t, decltype(fc)::value>(
          T, B, N, path.slices, Wt.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), go.data_ptr<scalar_t>(), len,
          g.data_ptr<scalar_t>(), g_next.defined() ? g_next.data_ptr<scalar_t>() : nullptr,
          dx.data_ptr<scalar_t>(), db_rows.data_ptr<double>());
    });
  });

  // dW = sum_t h_{t-1}^T da_t as GEMMs over all steps: h_{t-1} is out[t-1] for
  // t >= 1 and h0 for t = 0 (where a sequence has finished, da_t is zero).
  auto dW = at::zeros({N, N}, W.options());
  const int64_t rows = (T - 1) * B;  // explicit: N = 0 leaves a -1 ambiguous
  if (T > 1) at::mm_out(dW, out.narrow(0, 0, T - 1).reshape({rows, N}).t(), dx.narrow(0, 1, T - 1).reshape({rows, N}));
  if (T > 0 && h0) dW.addmm_(h0->t(), dx[0]);
  auto db = db_rows.sum(0).to(output.scalar_type());
  return {dx, dW, db, g};
}

}  // namespace

TORCH_LIBRARY_IMPL(nnrnn_fused, CPU, m) {
  m.impl("recurrence", &recurrence_cpu);
  m.impl("recurrence_backward", &recurrence_backward_cpu);
}

}  // namespace nnrnn::cpu
