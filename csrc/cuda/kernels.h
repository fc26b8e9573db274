// Kernel bodies of the CUDA recurrence, written once against kernel_env.h so that
// the same source is compiled by nvcc (DeviceEnv) and, for the CPU test, by g++
// (HostEnv in ../cpu/host_grid.h). No CUDA-only construct appears here.
//
// Persistent kernels (design note in docs/cuda.md):
//   - the grid is col_groups x row_groups blocks; block (cg, rg) owns columns
//     [col_begin(cg), col_begin(cg+1)) and rows [row_begin(rg), row_begin(rg+1))
//     of the product A @ W (A (B, N) = h_{t-1}) in the forward, A @ W^T (A = da_t)
//     in the backward. It keeps its column slice of W (or W^T) in shared memory,
//     in the accumulation type, for all steps. Few column groups and many row
//     groups: each block reads only its rows of A from L2 each step;
//   - per step it stages its rows of A a tile at a time into shared memory,
//     computes the tile's dot products (each split over `splits` threads along k,
//     summed in a fixed order: deterministic), and finishes its elements pointwise;
//   - one grid barrier per step: what a block writes in step t (its part of h_t,
//     or of da_{t-1}) is what the blocks read in step t + 1.
// The fallback path runs the same pointwise `finish` after a GEMM per step.
#pragma once

#include <cstdint>

#include "../activation.h"
#include "kernel_env.h"

namespace nnrnn::kern {

// How the work is split; computed on the host (driver.h), read by every thread.
struct Layout {
  int64_t T, B, N;
  int col_groups, row_groups;  // the grid: block = rg * col_groups + cg
  int max_cols;       // ceil(N / col_groups): the widest column slice
  int rows_per_tile;  // rows of A staged at a time
  int splits;         // threads sharing one dot product (along k)

  NNRNN_HD int grid() const { return col_groups * row_groups; }
  NNRNN_HD int64_t col_begin(int cg) const { return static_cast<int64_t>(cg) * N / col_groups; }
  NNRNN_HD int64_t row_begin(int rg) const { return static_cast<int64_t>(rg) * B / row_groups; }
  // Shared memory in elements of the accumulation type: Wslice (N x max_cols),
  // the A tile (rows_per_tile x (N + 1), padded against bank conflicts), partial sums.
  NNRNN_HD int64_t w_elems() const { return N * max_cols; }
  NNRNN_HD int64_t a_stride() const { return N + 1; }
  NNRNN_HD int64_t a_elems() const { return rows_per_tile * a_stride(); }
  NNRNN_HD int64_t tile_items() const { return static_cast<int64_t>(rows_per_tile) * max_cols; }
  NNRNN_HD int64_t shared_elems() const { return w_elems() + a_elems() + splits * tile_items(); }
};

inline Layout make_layout(int64_t T, int64_t B, int64_t N, int col_groups, int row_groups, int threads,
                          int rows_per_tile) {
  Layout L{T, B, N, col_groups, row_groups, 0, rows_per_tile, 1};
  L.max_cols = static_cast<int>((N + col_groups - 1) / col_groups);
  const int64_t items = L.tile_items();
  int64_t splits = items > 0 ? threads / items : 1;
  splits = splits < 1 ? 1 : (splits > N ? N : splits);
  L.splits = static_cast<int>(splits);
  return L;
}

// ---------------------------------------------------------------- the step, pointwise

// Forward, element (b, j) of step t, given dot = (h_{t-1} @ W)[b, j].
// state (2, B, N) holds h_t in slot t & 1, in the accumulation type (float for
// half/bfloat16: the recurrence is carried in float32; out is rounded).
template <typename scalar_t, typename acc_t>
struct ForwardArgs {
  const scalar_t* x;     // (T, B, N)
  const scalar_t* W;     // (N, N)
  const scalar_t* bias;  // (N,) or nullptr
  const scalar_t* h0;    // (B, N) or nullptr
  const int32_t* lengths;  // (B,) or nullptr
  scalar_t* out;         // (T, B, N)
  acc_t* state;          // (2, B, N)
  Layout L;
  Nonlinearity f;

  NNRNN_DEV acc_t prev(int64_t t, int64_t i) const {  // h_{t-1}, flat index i = b * N + k
    if (t == 0) return h0 ? static_cast<acc_t>(h0[i]) : acc_t(0);
    return state[((t - 1) & 1) * L.B * L.N + i];
  }
  NNRNN_HD bool zero_prev(int64_t t) const { return t == 0 && h0 == nullptr; }

  NNRNN_DEV void finish(int64_t t, int64_t b, int64_t j, acc_t dot) const {
    const int64_t i = b * L.N + j, o = t * L.B * L.N + i;
    acc_t* next = state + (t & 1) * L.B * L.N;
    if (lengths && t >= lengths[b]) {  // finished: output 0, state unchanged
      out[o] = static_cast<scalar_t>(acc_t(0));
      next[i] = prev(t, i);
      return;
    }
    const acc_t bj = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
    const acc_t h = activate<acc_t>(f, static_cast<acc_t>(x[o]) + dot, bj);
    out[o] = static_cast<scalar_t>(h);
    next[i] = h;
  }
};

// Backward, element (b, j) at step t, given dot = (da_t @ W^T)[b, j] (unused when
// t == T, the prologue). g (B, N) holds dL/dh_t on entry (grad_h_n at t == T) and
// dL/dh_{t-1} on exit; da (2, B, N) holds da_t in slot t & 1. Writes da_{t-1}
// (slot and dx), adds its bias term to db_rows, and at t == 0 writes grad_h0.
template <typename scalar_t, typename acc_t>
struct BackwardArgs {
  const scalar_t* grad_out;  // (T, B, N)
  const scalar_t* out;       // (T, B, N)
  const scalar_t* W;         // (N, N)
  const int32_t* lengths;    // (B,) or nullptr
  acc_t* g;                  // (B, N)
  acc_t* da;                 // (2, B, N)
  scalar_t* dx;              // (T, B, N)
  acc_t* db_rows;            // (B, N): sum over t, one owner per element (deterministic)
  scalar_t* grad_h0;         // (B, N)
  Layout L;
  Nonlinearity f;

  NNRNN_DEV bool valid(int64_t t, int64_t b) const { return t < L.T && (!lengths || t < lengths[b]); }
  NNRNN_DEV const acc_t* da_of(int64_t t) const { return da + (t & 1) * L.B * L.N; }

  NNRNN_DEV void finish(int64_t t, int64_t b, int64_t j, acc_t dot) const {
    const int64_t i = b * L.N + j;
    const acc_t gi = valid(t, b) ? dot : g[i];  // a finished step passes dL/dh through
    if (t == 0) {
      grad_h0[i] = static_cast<scalar_t>(gi);
      return;
    }
    g[i] = gi;
    const int64_t o = (t - 1) * L.B * L.N + i;
    acc_t d = acc_t(0);
    if (valid(t - 1, b)) {
      const acc_t h = static_cast<acc_t>(out[o]);
      d = (gi + static_cast<acc_t>(grad_out[o])) * derivative_from_output<acc_t>(f, h);
      db_rows[i] += d * bias_factor_from_output<acc_t>(f, h);
    }
    da[((t - 1) & 1) * L.B * L.N + i] = d;
    dx[o] = static_cast<scalar_t>(d);
  }
};

// ---------------------------------------------------------------- persistent kernels

// P[s][r][c] = sum over k in split s of A_tile[r][k] * Ws[k][c].
template <class Env, typename acc_t>
NNRNN_DEV void tile_product(const Env& env, const Layout& L, const acc_t* Ws, const acc_t* As, acc_t* P,
                            int rows, int ncols) {
  const int items = static_cast<int>(L.tile_items());
  const int N = static_cast<int>(L.N), mc = L.max_cols, lda = static_cast<int>(L.a_stride());
  for (int i = env.thread(); i < items * L.splits; i += env.threads()) {
    const int s = i / items, item = i - s * items;
    const int r = item / mc, c = item - r * mc;
    if (r >= rows || c >= ncols) continue;
    const int k0 = static_cast<int>(static_cast<int64_t>(s) * N / L.splits);
    const int k1 = static_cast<int>(static_cast<int64_t>(s + 1) * N / L.splits);
    const acc_t* a = As + r * lda;
    acc_t sum = acc_t(0);
#if defined(__CUDACC__)
#pragma unroll 4
#endif
    for (int k = k0; k < k1; ++k) sum += a[k] * Ws[k * mc + c];
    P[i] = sum;
  }
}

template <typename acc_t>
NNRNN_DEV acc_t tile_dot(const Layout& L, const acc_t* P, int r, int c) {
  const int items = static_cast<int>(L.tile_items());
  acc_t sum = acc_t(0);
  for (int s = 0; s < L.splits; ++s) sum += P[s * items + r * L.max_cols + c];
  return sum;
}

// One time step of a persistent kernel for this block's columns: for each tile
// of rows, stage A (when `load` is non-null), multiply, then finish(t, b, j, dot).
// The part of the grid a block owns: rows [row0, row1), columns [c0, c0 + ncols).
struct BlockPart {
  int64_t row0, row1, c0;
  int ncols;
};

template <class Env>
NNRNN_DEV BlockPart block_part(const Env& env, const Layout& L) {
  const int cg = env.block() % L.col_groups, rg = env.block() / L.col_groups;
  const int64_t c0 = L.col_begin(cg);
  return {L.row_begin(rg), L.row_begin(rg + 1), c0, static_cast<int>(L.col_begin(cg + 1) - c0)};
}

template <class Env, typename acc_t, class Load, class Finish>
NNRNN_DEV void persistent_step(const Env& env, const Layout& L, acc_t* Ws, const BlockPart& part, bool zero_a,
                               const Load& load, const Finish& finish) {
  acc_t* As = Ws + L.w_elems();
  acc_t* P = As + L.a_elems();
  const int N = static_cast<int>(L.N), ncols = part.ncols;
  const int64_t c0 = part.c0;
  for (int64_t r0 = part.row0; r0 < part.row1; r0 += L.rows_per_tile) {
    const int rows = static_cast<int>(part.row1 - r0 < L.rows_per_tile ? part.row1 - r0 : L.rows_per_tile);
    if (!zero_a) {
      for (int i = env.thread(); i < rows * N; i += env.threads()) {
        const int r = i / N, k = i - r * N;
        As[r * L.a_stride() + k] = load((r0 + r) * L.N + k);
      }
      env.sync_block();
      tile_product(env, L, Ws, As, P, rows, ncols);
      env.sync_block();
    }
    // The next tile's staging writes As only, and its product (which writes P)
    // comes after a block barrier: no barrier is needed after this loop.
    for (int item = env.thread(); item < rows * ncols; item += env.threads()) {
      const int r = item / ncols, c = item - r * ncols;
      finish(r0 + r, c0 + c, zero_a ? acc_t(0) : tile_dot(L, P, r, c));
    }
  }
}

// Loads the block's slice of W (transpose = false: columns of W; true: rows of
// W, i.e. columns of W^T) into shared memory as Ws[k][c].
template <class Env, typename scalar_t, typename acc_t>
NNRNN_DEV void load_w_slice(const Env& env, const Layout& L, const scalar_t* W, bool transpose, acc_t* Ws,
                            int64_t c0, int ncols) {
  if (ncols == 0) return;
  for (int64_t i = env.thread(); i < L.N * ncols; i += env.threads()) {
    const int64_t k = i / ncols, c = i - k * ncols;
    const int64_t src = transpose ? (c0 + c) * L.N + k : k * L.N + c0 + c;
    Ws[k * L.max_cols + c] = static_cast<acc_t>(W[src]);
  }
  env.sync_block();
}

template <typename scalar_t, typename acc_t>
struct PersistentForward {
  ForwardArgs<scalar_t, acc_t> a;
  unsigned long long* barrier;  // zeroed grid-barrier counter (device only)

  template <class Env>
  NNRNN_DEV void operator()(Env& env) const {
    const Layout& L = a.L;
    const BlockPart part = block_part(env, L);
    acc_t* Ws = env.template shared<acc_t>();
    load_w_slice(env, L, a.W, /*transpose=*/false, Ws, part.c0, part.ncols);
    for (int64_t t = 0; t < L.T; ++t) {
      persistent_step(
          env, L, Ws, part, a.zero_prev(t), [&](int64_t i) { return a.prev(t, i); },
          [&](int64_t b, int64_t j, acc_t dot) { a.finish(t, b, j, dot); });
      if (t + 1 < L.T) env.sync_grid();  // h_t complete before any block reads it
    }
  }
};

template <typename scalar_t, typename acc_t>
struct PersistentBackward {
  BackwardArgs<scalar_t, acc_t> a;
  unsigned long long* barrier;

  template <class Env>
  NNRNN_DEV void operator()(Env& env) const {
    const Layout& L = a.L;
    const BlockPart part = block_part(env, L);
    acc_t* Ws = env.template shared<acc_t>();
    load_w_slice(env, L, a.W, /*transpose=*/true, Ws, part.c0, part.ncols);
    // Prologue: da_{T-1} of the block's elements, from grad_h_n.
    if (part.ncols > 0)
      for (int64_t item = env.thread(); item < (part.row1 - part.row0) * part.ncols; item += env.threads())
        a.finish(L.T, part.row0 + item / part.ncols, part.c0 + item % part.ncols, acc_t(0));
    for (int64_t t = L.T - 1; t >= 0; --t) {
      env.sync_grid();  // da_t complete before any block reads it
      const acc_t* da_t = a.da_of(t);
      persistent_step(
          env, L, Ws, part, /*zero_a=*/false, [&](int64_t i) { return da_t[i]; },
          [&](int64_t b, int64_t j, acc_t dot) { a.finish(t, b, j, dot); });
    }
  }
};

// ---------------------------------------------------------------- fallback: pointwise per step

// finish() over all B x N elements of step t, with dots = the step's GEMM
// result (B, N), or nullptr for zeros. Any grid and block size.
template <class Args, typename acc_t>
struct PointwiseStep {
  Args a;
  const acc_t* dots;
  int64_t t;

  template <class Env>
  NNRNN_DEV void operator()(Env& env) const {
    const int64_t total = a.L.B * a.L.N;
    const int64_t stride = static_cast<int64_t>(env.blocks()) * env.threads();
    for (int64_t i = static_cast<int64_t>(env.block()) * env.threads() + env.thread(); i < total; i += stride)
      a.finish(t, i / a.L.N, i % a.L.N, dots ? dots[i] : acc_t(0));
  }
};

}  // namespace nnrnn::kern
