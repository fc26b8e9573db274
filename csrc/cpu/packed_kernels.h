// The CPU time loops of the packed path (packed_cpu.cpp chooses it per shape).
//
// Per call, W (forward) or W^T (backward) is packed once into column panels, the
// layout the micro-kernel reads contiguously (packed_cpu.cpp). A worker runs the
// whole time loop for its rows of the batch (a batch slice, or all rows): every
// step it computes its panels' columns for its running rows and applies the
// nonlinearity (or the derivative from the output) to each tile right after the
// tile's last FMA. Slices share nothing but the packed W, so they never wait for
// one another; the threads of a Team that split one slice's columns meet at a
// barrier every step. No BLAS call and no allocation inside the time loop. The
// backward also accumulates the slice's dW (a rank-update per step, in registers
// tile by tile) and db in the slice's own buffers, summed over the slices in a
// fixed order after the loop. A column of a slice is always computed by one thread
// in one order, and rows never mix: the outputs and the gradients of x and h0 are
// the same bits whatever the number of threads and slices; dW and db are the same
// bits for the same number of slices (packed_cpu.cpp chooses it).
//
// One micro-kernel template: vectors are GCC/Clang vector extensions whose width
// is a template parameter. packed_cpu.cpp instantiates the workers once per ISA
// (AVX-512, AVX2, and a 16-byte-vector generic one: SSE2 on x86-64, NEON on
// aarch64) inside functions that carry the ISA's target attribute and inline
// everything below. at::vec fixes its width per translation unit at compile
// time (one extra translation unit and flag set per ISA, and ODR care for every
// inline function they share); intrinsics would mean one copy per ISA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "../activation.h"
#include "team.h"

#define NNRNN_UNROLL _Pragma("GCC unroll 16")

namespace nnrnn::cpu::packed {

// A tile is MR rows (MR <= MaxRows) by kCols = kVecs vectors of columns, held in
// MR * kVecs accumulator registers.
template <typename T, int VecBytes, int MaxRows>
struct Isa {
  using scalar = T;
  typedef T vec __attribute__((vector_size(VecBytes)));
  static constexpr int kLanes = VecBytes / static_cast<int>(sizeof(T));
  static constexpr int kVecs = 2;
  static constexpr int kCols = kLanes * kVecs;
  static constexpr int kMaxRows = MaxRows;
};

// Forward of one worker: out (steps, B, N) = h_t from x (steps, B, N) for its
// `rows` rows, taken in `order` (by decreasing length); at step t the first
// active[t] of them are running and the rest output zero.
template <typename T>
struct ForwardArgs {
  int64_t steps, B, N, rows;
  const T* x;
  const T* bias;
  const T* h0;  // nullptr: zero initial state
  T* out;
  const int64_t* order;
  const int64_t* active;
  Nonlinearity f;
  const T* packed_W;  // panels(N) * N * kCols
  int slow_member_us;  // tests: the last member sleeps this long before each step
};

// Backward of one worker, for the rows as in ForwardArgs: dx (steps, B, N) = da_t
// and grad_h0 (B, N) for its rows; this slice's dW (in column panels, as W^T is
// packed) and db (a block's rows summed in T, then accumulated in double).
template <typename T>
struct BackwardArgs {
  int64_t steps, B, N, rows;
  const T* out;
  const T* grad_out;
  const T* grad_h_n;
  const T* h0;  // nullptr: zero initial state
  const int64_t* order;
  const int64_t* active;
  Nonlinearity f;
  T* dx;
  T* grad_h0;
  double* db;    // N
  const T* packed_Wt;  // panels(N) * N * kCols
  T* packed_dW;  // panels(N) * N * kCols
  T* packed_d;   // panels(N) * kDwSteps * rows * kCols: the da of the last steps, per panel
  int slow_member_us;
};

// The backward adds h_{t-1}^T da_t to dW for kDwSteps steps at a time: each dW tile
// is loaded and stored once per kDwSteps steps instead of every step (a slice of a
// few rows makes a thin update; N=128 holds dW in 64 KB, more than L1). The steps are
// added in the same order either way, so the bits do not change.
constexpr int64_t kDwSteps = 4;

// Panels of `cols` columns each that hold n columns (the last one zero-padded).
inline int64_t panel_count(int64_t n, int64_t cols) {
  return (n + cols - 1) / cols;
}

// acc[i] += sum over s < depth of a(i, s) * b[s * b_stride, +kCols): the micro-kernel.
template <class I, int MR, class A>
inline void fma_tile(int64_t depth, const A& a, const typename I::scalar* b, int64_t b_stride,
                     typename I::vec (&acc)[MR][I::kVecs]) {
  using V = typename I::vec;
  for (int64_t s = 0; s < depth; ++s) {
    V bv[I::kVecs];
    NNRNN_UNROLL
    for (int v = 0; v < I::kVecs; ++v) std::memcpy(&bv[v], b + s * b_stride + v * I::kLanes, sizeof(V));
    NNRNN_UNROLL
    for (int i = 0; i < MR; ++i) {
      const V ai = a(i, s) - V{};  // a broadcast (x - 0 is x)
      NNRNN_UNROLL
      for (int v = 0; v < I::kVecs; ++v) acc[i][v] += ai * bv[v];
    }
  }
}

template <class I, int MR>
inline void store_tile(const typename I::vec (&acc)[MR][I::kVecs], typename I::scalar* tile, int64_t stride) {
  NNRNN_UNROLL
  for (int i = 0; i < MR; ++i) {
    NNRNN_UNROLL
    for (int v = 0; v < I::kVecs; ++v) std::memcpy(tile + i * stride + v * I::kLanes, &acc[i][v], sizeof(acc[i][v]));
  }
}

template <class I, int MR>
inline void load_tile(typename I::vec (&acc)[MR][I::kVecs], const typename I::scalar* tile, int64_t stride) {
  NNRNN_UNROLL
  for (int i = 0; i < MR; ++i) {
    NNRNN_UNROLL
    for (int v = 0; v < I::kVecs; ++v) std::memcpy(&acc[i][v], tile + i * stride + v * I::kLanes, sizeof(acc[i][v]));
  }
}

// Calls fn(std::integral_constant<int, mr>{}) for 1 <= mr <= I::kMaxRows: one
// tile routine per row count, each with its accumulators in registers.
template <class I, int MR = I::kMaxRows, class Fn>
inline void with_rows(int mr, const Fn& fn) {
  if constexpr (MR > 1) {
    if (mr < MR) return with_rows<I, MR - 1>(mr, fn);
  }
  fn(std::integral_constant<int, MR>{});
}

// body(first, count) over [0, m) in balanced blocks of at most I::kMaxRows.
template <class I, class Body>
inline void row_blocks(int64_t m, const Body& body) {
  const int64_t blocks = (m + I::kMaxRows - 1) / I::kMaxRows;
  for (int64_t k = 0, first = 0; k < blocks; ++k) {
    const int count = static_cast<int>(m / blocks + (k < m % blocks ? 1 : 0));
    body(first, count);
    first += count;
  }
}

// Panels [p0, p1) of `cols` columns of the K x C matrix whose (k, c) element is
// src[k * ks + c * cs], zero beyond column C: panel p holds (k, p * cols + c) at
// ((p * K) + k) * cols + c.
template <typename T>
inline void pack_panels(const T* src, int64_t ks, int64_t cs, int64_t K, int64_t C, int64_t cols, int64_t p0,
                        int64_t p1, T* dst) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c0 = p * cols, ncols = std::min<int64_t>(cols, C - c0);
    T* panel = dst + p * K * cols;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < cols; ++c) panel[k * cols + c] = c < ncols ? src[k * ks + (c0 + c) * cs] : 0;
    }
  }
}

// The epilogues: the same pointwise math as the BLAS path (activation.h).
template <Nonlinearity F, typename T>
inline void activate_row(const T* __restrict__ acc, const T* __restrict__ x, const T* __restrict__ bias,
                         T* __restrict__ h, int64_t ncols) {
  for (int64_t c = 0; c < ncols; ++c) h[c] = activate<T>(F, x[c] + acc[c], bias[c]);
}

template <typename T>
inline void activate_row(Nonlinearity f, const T* acc, const T* x, const T* bias, T* h, int64_t ncols) {
  switch (f) {
    case Nonlinearity::ModReLU: return activate_row<Nonlinearity::ModReLU>(acc, x, bias, h, ncols);
    case Nonlinearity::Tanh: return activate_row<Nonlinearity::Tanh>(acc, x, bias, h, ncols);
    case Nonlinearity::ReLU: return activate_row<Nonlinearity::ReLU>(acc, x, bias, h, ncols);
  }
}

// da = (g + grad_out) * dh/dz from the output h; db_part += da * (dh/db)/(dh/dz).
template <Nonlinearity F, typename T>
inline void derivative_row(const T* __restrict__ g, const T* __restrict__ go, const T* __restrict__ h,
                           T* __restrict__ da, T* __restrict__ da_packed, T* __restrict__ db_part, int64_t ncols) {
  for (int64_t c = 0; c < ncols; ++c) {
    const T d = (g[c] + go[c]) * derivative_from_output<T>(F, h[c]);
    da[c] = d;
    da_packed[c] = d;
    db_part[c] += d * bias_factor_from_output<T>(F, h[c]);
  }
}

template <typename T>
inline void derivative_row(Nonlinearity f, const T* g, const T* go, const T* h, T* da, T* da_packed, T* db_part,
                           int64_t ncols) {
  switch (f) {
    case Nonlinearity::ModReLU: return derivative_row<Nonlinearity::ModReLU>(g, go, h, da, da_packed, db_part, ncols);
    case Nonlinearity::Tanh: return derivative_row<Nonlinearity::Tanh>(g, go, h, da, da_packed, db_part, ncols);
    case Nonlinearity::ReLU: return derivative_row<Nonlinearity::ReLU>(g, go, h, da, da_packed, db_part, ncols);
  }
}

// Panels [first, last) of this member: a contiguous, balanced share.
struct PanelRange {
  int64_t first, last;
};
inline PanelRange my_panels(int64_t panels, const Team& team) {
  return {panels * team.member() / team.members(), panels * (team.member() + 1) / team.members()};
}

inline double share(const PanelRange& mine, int64_t panels) {
  return static_cast<double>(mine.last - mine.first) / static_cast<double>(panels);
}

inline void slow_down(int us, const Team& team) {
  if (us > 0 && team.members() > 1 && team.member() == team.members() - 1) {
    std::this_thread::sleep_for(std::chrono::microseconds(us));
  }
}

// mr rows of C for one panel: acc = A (mr x K) @ panel (K x kCols), where
// accumulate(MRc, acc) adds A's FMAs; then epilogue(i, acc row i) for each row.
template <class I, class Accumulate, class Epilogue>
inline void tile_rows(int mr, const Accumulate& accumulate, const Epilogue& epilogue) {
  with_rows<I>(mr, [&](auto MRc) {
    constexpr int MR = decltype(MRc)::value;
    typename I::vec acc[MR][I::kVecs] = {};
    accumulate(MRc, acc);
    alignas(64) typename I::scalar tile[MR][I::kCols];
    store_tile<I, MR>(acc, &tile[0][0], I::kCols);
    for (int i = 0; i < MR; ++i) epilogue(i, tile[i]);
  });
}

// A's rows picked by `rows` from a (B, K) matrix at a (nullptr: zero).
template <class I, class Epilogue>
inline void gemm_rows(const typename I::scalar* a, int64_t K, const int64_t* rows, int mr,
                      const typename I::scalar* panel, const Epilogue& epilogue) {
  using T = typename I::scalar;
  tile_rows<I>(mr, [&](auto MRc, auto& acc) {
    constexpr int MR = decltype(MRc)::value;
    if (a == nullptr) return;
    const T* a_rows[MR];
    NNRNN_UNROLL
    for (int i = 0; i < MR; ++i) a_rows[i] = a + rows[i] * K;
    fma_tile<I, MR>(K, [&](int i, int64_t k) { return a_rows[i][k]; }, panel, I::kCols, acc);
  }, epilogue);
}

// A kept in column panels of kCols, mr consecutive rows in each: A (i, k) at
// a + (k / kCols) * panel_stride + i * kCols + k % kCols. One pointer reaches every
// row (with mr=5 on AVX-512, gemm_rows' row pointers outnumbered the free registers and
// were reloaded from the stack in the inner loop).
template <class I, class Epilogue>
inline void gemm_paneled_rows(const typename I::scalar* a, int64_t panel_stride, int64_t K, int mr,
                              const typename I::scalar* panel, const Epilogue& epilogue) {
  tile_rows<I>(mr, [&](auto MRc, auto& acc) {
    constexpr int MR = decltype(MRc)::value;
    for (int64_t k0 = 0, p = 0; k0 < K; k0 += I::kCols, ++p) {
      const typename I::scalar* a_p = a + p * panel_stride;
      fma_tile<I, MR>(std::min<int64_t>(I::kCols, K - k0), [&](int i, int64_t k) { return a_p[i * I::kCols + k]; },
                      panel + k0 * I::kCols, I::kCols, acc);
    }
  }, epilogue);
}

template <class I>
void forward_worker(const ForwardArgs<typename I::scalar>& a, Team& team) {
  using T = typename I::scalar;
  const int64_t N = a.N, BN = a.B * a.N, panels = panel_count(N, I::kCols);
  PanelRange mine = my_panels(panels, team);

  for (int64_t t = 0; t < a.steps; ++t) {
    slow_down(a.slow_member_us, team);
    T* cur = a.out + t * BN;
    const T* x = a.x + t * BN;
    const T* prev = t > 0 ? cur - BN : a.h0;  // running rows at t were running at t - 1
    const int64_t running = a.active[t];
    for (int64_t p = mine.first; p < mine.last; ++p) {
      const int64_t c0 = p * I::kCols, ncols = std::min<int64_t>(I::kCols, N - c0);
      const T* panel = a.packed_W + p * N * I::kCols;
      row_blocks<I>(running, [&](int64_t first, int mr) {
        const int64_t* rows = a.order + first;
        gemm_rows<I>(prev, N, rows, mr, panel, [&](int i, const T* acc) {
          const int64_t o = rows[i] * N + c0;
          activate_row(a.f, acc, x + o, a.bias + c0, cur + o, ncols);
        });
      });
      for (int64_t s = running; s < a.rows; ++s) std::fill_n(cur + a.order[s] * N + c0, ncols, T(0));
    }
    if (t + 1 < a.steps) {
      if (!team.sync(share(mine, panels))) return;
      mine = my_panels(panels, team);  // every panel once the team went solo
    }
  }
}

template <class I>
void backward_worker(const BackwardArgs<typename I::scalar>& a, Team& team) {
  using T = typename I::scalar;
  const int64_t N = a.N, rows = a.rows, BN = a.B * N, panels = panel_count(N, I::kCols);
  const int64_t d_panel_stride = kDwSteps * rows * I::kCols;
  PanelRange mine = my_panels(panels, team);
  for (int64_t p = mine.first; p < mine.last; ++p) {
    std::fill_n(a.packed_dW + p * N * I::kCols, N * I::kCols, T(0));
    // columns past N stay zero
    std::fill_n(a.packed_d + p * kDwSteps * rows * I::kCols, kDwSteps * rows * I::kCols, T(0));
    const int64_t c0 = p * I::kCols;
    std::fill_n(a.db + c0, std::min<int64_t>(I::kCols, N - c0), 0.0);
  }

  // Step t: g = da_{t+1} W^T for the rows running at t + 1, grad_h_n for rows whose
  // last step is t; da_t = (g + grad_out_t) * dh/dz, kept in slot `slot` of packed_d;
  // when the slots are full (or at t = 0), dW += h_{t'-1}^T da_t' for their steps t'.
  for (int64_t t = a.steps - 1; t >= 0; --t) {
    const int64_t slot = (a.steps - 1 - t) % kDwSteps;
    slow_down(a.slow_member_us, team);
    const T* h = a.out + t * BN;
    const T* go = a.grad_out + t * BN;
    T* da = a.dx + t * BN;
    // da_{t+1} as the step before kept it in packed_d (its slot, panel 0)
    const T* d_next = a.packed_d + ((slot + kDwSteps - 1) % kDwSteps) * rows * I::kCols;
    const int64_t running = a.active[t], running_next = t + 1 < a.steps ? a.active[t + 1] : 0;
    for (int64_t p = mine.first; p < mine.last; ++p) {
      const int64_t c0 = p * I::kCols, ncols = std::min<int64_t>(I::kCols, N - c0);
      T* d_packed = a.packed_d + (p * kDwSteps + slot) * rows * I::kCols;
      // db: summed over a block's rows in T, then added in double (converting each
      // row's terms to double took 17% of the backward's samples at N=128 B=10, AVX-512)
      alignas(64) T db_part[I::kCols];
      auto derivative = [&](int64_t s, const T* g) {
        const int64_t o = a.order[s] * N + c0;
        derivative_row(a.f, g, go + o, h + o, da + o, d_packed + s * I::kCols, db_part, ncols);
      };
      auto add_db = [&] {
        for (int64_t c = 0; c < ncols; ++c) a.db[c0 + c] += static_cast<double>(db_part[c]);
      };
      row_blocks<I>(running_next, [&](int64_t first, int mr) {
        std::fill_n(db_part, I::kCols, T(0));
        gemm_paneled_rows<I>(d_next + first * I::kCols, d_panel_stride, N, mr, a.packed_Wt + p * N * I::kCols,
                             [&](int i, const T* acc) { derivative(first + i, acc); });
        add_db();
      });
      if (running_next < running) {
        std::fill_n(db_part, I::kCols, T(0));
        for (int64_t s = running_next; s < running; ++s) derivative(s, a.grad_h_n + a.order[s] * N + c0);
        add_db();
      }
      for (int64_t s = running; s < rows; ++s) std::fill_n(da + a.order[s] * N + c0, ncols, T(0));
    }
    const unsigned round = team.arrive();

    // While the others finish the step: dW[:, my columns] += h_{t'-1}^T da_t' for the
    // steps t' = t + slot, ..., t in the slots, in that order. Reads only h (never
    // written here) and this member's own buffers. The schedule depends on t alone:
    // a member that takes over panels (the team went solo) adds the slots that the
    // leaver filled.
    if (slot == kDwSteps - 1 || t == 0) {
      for (int64_t p = mine.first; p < mine.last; ++p) {
        T* dW_panel = a.packed_dW + p * N * I::kCols;
        row_blocks<I>(N, [&](int64_t k0, int mk) {
          with_rows<I>(mk, [&](auto MRc) {
            constexpr int MR = decltype(MRc)::value;
            typename I::vec acc[MR][I::kVecs];
            load_tile<I, MR>(acc, dW_panel + k0 * I::kCols, I::kCols);
            for (int64_t j = 0; j <= slot; ++j) {
              const int64_t tj = t + slot - j;
              const T* h_prev = tj > 0 ? a.out + (tj - 1) * BN : a.h0;
              if (h_prev == nullptr) continue;
              fma_tile<I, MR>(
                  a.active[tj], [&](int i, int64_t s) { return h_prev[a.order[s] * N + k0 + i]; },
                  a.packed_d + (p * kDwSteps + j) * rows * I::kCols, I::kCols, acc);
            }
            store_tile<I, MR>(acc, dW_panel + k0 * I::kCols, I::kCols);
          });
        });
      }
    }
    if (!team.wait(round, share(mine, panels))) return;
    mine = my_panels(panels, team);
  }

  // grad_h0 = da_0 W^T for rows that ran at step 0, grad_h_n for the others.
  const int64_t running0 = a.steps > 0 ? a.active[0] : 0;
  for (int64_t p = mine.first; p < mine.last; ++p) {
    const int64_t c0 = p * I::kCols, ncols = std::min<int64_t>(I::kCols, N - c0);
    row_blocks<I>(running0, [&](int64_t first, int mr) {
      const int64_t* rows = a.order + first;
      gemm_rows<I>(a.dx, N, rows, mr, a.packed_Wt + p * N * I::kCols,
                   [&](int i, const T* acc) { std::copy_n(acc, ncols, a.grad_h0 + rows[i] * N + c0); });
    });
    for (int64_t s = running0; s < rows; ++s) {
      const int64_t o = a.order[s] * N + c0;
      std::copy_n(a.grad_h_n + o, ncols, a.grad_h0 + o);
    }
  }
}

// dW[:, panel p's columns] = the sum over the slices, in order, of their dW in
// panels of `cols` columns; db likewise. Panels [p0, p1).
template <typename T>
void sum_slices(int64_t N, int64_t cols, int64_t slices, const T* const* packed_dW, const double* const* db,
                int64_t p0, int64_t p1, T* dW, double* db_sum) {
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t c0 = p * cols, ncols = std::min<int64_t>(cols, N - c0);
    for (int64_t k = 0; k < N; ++k) {
      const int64_t at = (p * N + k) * cols;
      for (int64_t c = 0; c < ncols; ++c) {
        T sum = packed_dW[0][at + c];
        for (int64_t s = 1; s < slices; ++s) sum += packed_dW[s][at + c];
        dW[k * N + c0 + c] = sum;
      }
    }
    for (int64_t c = c0; c < c0 + ncols; ++c) {
      double sum = db[0][c];
      for (int64_t s = 1; s < slices; ++s) sum += db[s][c];
      db_sum[c] = sum;
    }
  }
}

}  // namespace nnrnn::cpu::packed
