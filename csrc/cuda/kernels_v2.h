// Kernel v2 of the CUDA recurrence (design, cost model and static evidence: docs/cuda.md).
// Written against kernel_env.h like kernels.h, so that the host emulation
// (../cpu/host_grid.h) runs this same source.
//
// Rows of the batch are independent. The grid is cut into `teams`; a team owns a
// slice of the batch rows and one whole copy of W, spread over its `team_blocks`
// blocks (block q owns columns [col_begin(q), col_begin(q+1)) of the product).
// Only blocks of one team exchange data: A_{s+1}, the operand of the next step's
// product (h_t in the forward, da_{t-1} in the backward), in one of three ways:
//   Block:   one block per team; the exchange is the block's own shared memory.
//   Cluster: one thread-block cluster per team (sm_90). A block writes its slice of
//            A_{s+1} into every peer's shared memory (distributed shared memory)
//            with st.async, which counts the bytes on the peer's mbarrier of that
//            producer and slot (no fence, no separate signal); each warp waits
//            only for the producers of its own k-chunk.
//   Grid:    the team's blocks anywhere in a cooperative grid. Slices go through
//            global memory; the last warp of a producer to write its elements of a
//            row tile publishes a counter of the rows written (release); before
//            each tile a warp waits (acquire) for the producers of its k-chunk, then
//            copies its chunk of the tile's rows into shared memory. Only for W too
//            large for a cluster.
// No barrier spans two teams.
//
// Inside a block, each thread keeps a KT x CT tile of W in registers for the
// whole sequence: KT consecutive values of k (its chunk kq) for CT columns. A warp's
// lanes are lanes_k x lanes_c: lanes_c columns (times CT) by lanes_k chunks of k.
// Per row the thread reads its KT values of A with 16-byte shared loads that the
// lanes of a warp make at lanes_k addresses (a broadcast: one wavefront) and does
// KT x CT FMAs, so one 16-byte load feeds 4 x CT float32 FMAs; rows go in pairs
// (2 x CT independent accumulators). It stores its partial sums into P[r][column][kq];
// after a block barrier the thread owning element (r, column) adds the partials
// of all chunks, 16 bytes at a time, in a fixed order (the result is deterministic),
// applies the pointwise step and publishes the element. No block barrier follows a
// tile's finish but the step's last (two buffers of P): one warp's finish overlaps
// other warps' product of the next tile.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../activation.h"
#include "exchange.h"
#include "kernel_env.h"

namespace nnrnn::kern {

// The register tile of one thread: KT values of k (whole 16-byte vectors) for CT
// columns; warps of LANES threads.
template <int KT_, int CT_, int LANES_>
struct TileShape {
  static constexpr int KT = KT_;
  static constexpr int CT = CT_;
  static constexpr int LANES = LANES_;
};

// The tile shape on the GPU: 32 float32 (16 float64) values of k for 2 columns, 256
// bytes of W in 64 registers per thread; at most 512 threads per block (up to 128
// registers each): 128 KB of W per block.
constexpr int kV2Lanes = 32;
constexpr int kV2Columns = 2;
constexpr int kV2MaxThreads = 512;
NNRNN_HD constexpr int v2_kt(int64_t acc_size) { return acc_size == 8 ? 16 : 32; }
template <typename acc_t>
using DeviceTileShape = TileShape<v2_kt(sizeof(acc_t)), kV2Columns, kV2Lanes>;
// Instructions per pair of rows in the product's inner loop besides the FMAs and the
// 16-byte loads (the partial sums' stores, their addresses, the loop): 14 in nvcc 13.0's
// SASS for sm_90. The cost model counts this many (an odd last row as a pair); the static
// check (benchmarks/static_check.py) fails when the SASS has more.
constexpr int kV2PairOverhead = 14;
// Instructions per k-chunk in the loop that adds an element's partial sums, 16 bytes at
// a time: in the same SASS, float32 1.34375 (16 16-byte loads, 64 adds and 6 others per
// 64 chunks), float64 1.6875 (16 loads, 32 adds, 6 others per 32). The cost model counts
// this many; the static check fails when the SASS has more.
constexpr double kV2FinishPerChunkFloat = 1.34375;
constexpr double kV2FinishPerChunkDouble = 1.6875;

// How the work is split; computed on the host (driver.h), read by every thread.
struct LayoutV2 {
  int64_t T, B, N;
  Exchange exchange;
  int team_blocks;    // C: blocks of one team (the cluster size with Exchange::Cluster)
  int teams;          // G: the grid is teams x team_blocks blocks, block = g * C + q
  int rows_per_tile;  // rows of the team multiplied between two block barriers
  int kt, ct, lanes;  // the TileShape's constants, for the host's arithmetic

  NNRNN_HD int k_chunks() const { return static_cast<int>((N + kt - 1) / kt); }
  NNRNN_HD int max_cols() const { return static_cast<int>((N + team_blocks - 1) / team_blocks); }
  // Lanes of a warp along the columns: the fewest (a power of 2) that cover a block's columns.
  NNRNN_HD int lanes_c() const {
    int n = 1;
    while (n < lanes && n * ct < max_cols()) n *= 2;
    return n;
  }
  NNRNN_HD int lanes_k() const { return lanes / lanes_c(); }
  NNRNN_HD int k_warps() const { return (k_chunks() + lanes_k() - 1) / lanes_k(); }
  NNRNN_HD int col_warps() const { return (max_cols() + lanes_c() * ct - 1) / (lanes_c() * ct); }
  NNRNN_HD int threads() const { return k_warps() * col_warps() * lanes; }
  NNRNN_HD int grid() const { return teams * team_blocks; }
  NNRNN_HD int64_t col_begin(int q) const { return static_cast<int64_t>(q) * N / team_blocks; }
  NNRNN_HD unsigned slice_bytes(int rows, int q, int64_t acc_size) const {  // rows x block q's columns
    return static_cast<unsigned>(rows * (col_begin(q + 1) - col_begin(q)) * acc_size);
  }
  NNRNN_HD int64_t row_begin(int g) const { return static_cast<int64_t>(g) * B / teams; }
  NNRNN_HD int max_rows() const { return static_cast<int>((B + teams - 1) / teams); }
  // Shared memory: A (slots x max_rows x a_stride, k padded with zeros to the
  // threads' chunks), P (rows_per_tile x p_cols x p_stride: an element's partial
  // sums side by side, which the finish reads 16 bytes at a time), then 2 x C
  // mbarriers (Cluster).
  NNRNN_HD int chunk_slots() const { return k_warps() * lanes_k(); }
  NNRNN_HD int a_stride() const { return chunk_slots() * kt; }
  NNRNN_HD int slots() const { return exchange == Exchange::Grid ? 1 : 2; }
  NNRNN_HD int p_cols() const { return col_warps() * lanes_c() * ct; }
  // The 16-byte vectors of an element's partial sums that the finish adds (the slots
  // beyond chunk_slots hold zeros).
  NNRNN_HD int p_vectors(int64_t acc_size) const { return static_cast<int>((chunk_slots() * acc_size + 15) / 16); }
  // P's stride between elements: an odd number of vectors, so that the finish's lanes
  // (consecutive elements) load from all of the banks.
  NNRNN_HD int p_stride(int64_t acc_size) const {
    return (p_vectors(acc_size) | 1) * static_cast<int>(16 / acc_size);
  }
  NNRNN_HD int64_t a_elems() const { return static_cast<int64_t>(slots()) * max_rows() * a_stride(); }
  // P of one tile; p_buffer_count() of them.
  NNRNN_HD int64_t p_tile_elems(int64_t acc_size) const {
    return static_cast<int64_t>(rows_per_tile) * p_cols() * p_stride(acc_size);
  }
  NNRNN_HD int p_buffers() const { return p_buffer_count(exchange, max_rows(), rows_per_tile); }
  NNRNN_HD int64_t p_elems(int64_t acc_size) const { return p_buffers() * p_tile_elems(acc_size); }
  NNRNN_HD int64_t barrier_offset(int64_t acc_size) const {
    return ((a_elems() + p_elems(acc_size)) * acc_size + 15) / 16 * 16;
  }
  NNRNN_HD int64_t shared_bytes(int64_t acc_size) const {
    return barrier_offset(acc_size) + exchange_sync_bytes(exchange, team_blocks);
  }

  // The functions above, evaluated once on the host (derive()): the kernel reads
  // them as parameters instead of keeping them in registers beside W (P's steps
  // between rows and between a thread's columns too: parameters cost the inner
  // loop fewer instructions than products of two).
  struct Derived {
    int lanes_c, lanes_k, k_warps, a_stride, p_cols, p_vectors, p_stride, p_row_step, p_col_step, p_tile_elems,
        p_elems, slot_elems, a_elems, barrier_offset;
  } d;
  void derive(int64_t acc_size) {
    d = Derived{lanes_c(),
                lanes_k(),
                k_warps(),
                a_stride(),
                p_cols(),
                p_vectors(acc_size),
                p_stride(acc_size),
                p_cols() * p_stride(acc_size),
                lanes_c() * p_stride(acc_size),
                static_cast<int>(p_tile_elems(acc_size)),
                static_cast<int>(p_elems(acc_size)),
                slots() == 2 ? max_rows() * a_stride() : 0,
                static_cast<int>(a_elems()),
                static_cast<int>(barrier_offset(acc_size))};
  }
};

// ---------------------------------------------------------------- the two problems

// Forward: step s is time t = s; A_s = h_{s-1} (A_0 = h0 or 0); A_{s+1} = h_s.
// `state` (2, B, N): the Grid exchange, A_m in slot (m + 1) & 1; h_n = A_T is
// written there by every exchange (slot (T - 1) & 1, as kernel v1 leaves it).
template <typename scalar_t, typename acc_t_>
struct ForwardV2 {
  using acc_t = acc_t_;
  struct Inputs {
    acc_t x, bias;
  };
  const scalar_t* x;       // (T, B, N)
  const scalar_t* W;       // (N, N)
  const scalar_t* bias;    // (N,) or nullptr
  const scalar_t* h0;      // (B, N) or nullptr
  const int32_t* lengths;  // (B,) or nullptr
  scalar_t* out;           // (T, B, N)
  acc_t* state;            // (2, B, N)
  unsigned long long* flags;  // (teams, C), zeroed: Grid's step counters
  LayoutV2 L;
  Nonlinearity f;

  NNRNN_DEV acc_t weight(int64_t k, int64_t j) const { return static_cast<acc_t>(W[k * L.N + j]); }
  NNRNN_DEV acc_t initial(int64_t b, int64_t k) const { return h0 ? static_cast<acc_t>(h0[b * L.N + k]) : acc_t(0); }
  NNRNN_DEV void prologue(int64_t, int64_t) const {}
  NNRNN_DEV acc_t* exchange(int64_t m) const { return state + ((m + 1) & 1) * L.B * L.N; }
  NNRNN_DEV Inputs fetch(int64_t s, int64_t b, int64_t j) const {
    return {static_cast<acc_t>(x[(s * L.B + b) * L.N + j]), bias ? static_cast<acc_t>(bias[j]) : acc_t(0)};
  }
  // Element (b, j) of step s; returns A_{s+1}[b, j].
  NNRNN_DEV acc_t finish(int64_t s, int64_t b, int64_t j, acc_t dot, acc_t prev, const Inputs& in) const {
    const bool running = !lengths || s < lengths[b];  // a finished sequence outputs 0 and keeps its state
    const acc_t h = running ? activate<acc_t>(f, in.x + dot, in.bias) : prev;
    out[(s * L.B + b) * L.N + j] = static_cast<scalar_t>(running ? h : acc_t(0));
    if (s + 1 == L.T) exchange(L.T)[b * L.N + j] = h;  // h_n
    return h;
  }
};

// Backward: step s is time t = T - 1 - s; A_s = da_t (A_0 = da_{T-1}, from
// grad_h_n: the prologue); A_{s+1} = da_{t-1}. g (B, N) holds dL/dh_t, one owner
// per element (only the owner reads it: other blocks may be steps ahead);
// `da` (2, B, N) is the Grid exchange.
template <typename scalar_t, typename acc_t_>
struct BackwardV2 {
  using acc_t = acc_t_;
  struct Inputs {
    acc_t g, grad_out, out;
  };
  const scalar_t* grad_out;  // (T, B, N)
  const scalar_t* out;       // (T, B, N)
  const scalar_t* W;         // (N, N)
  const int32_t* lengths;    // (B,) or nullptr
  const scalar_t* grad_h_n;  // (B, N): read by every block for A_0 (g changes meanwhile)
  acc_t* g;                  // (B, N): grad_h_n on entry
  acc_t* da;                 // (2, B, N)
  scalar_t* dx;              // (T, B, N)
  acc_t* db_rows;            // (B, N)
  scalar_t* grad_h0;         // (B, N)
  unsigned long long* flags;
  LayoutV2 L;
  Nonlinearity f;

  NNRNN_DEV bool valid(int64_t t, int64_t b) const { return t < L.T && (!lengths || t < lengths[b]); }
  NNRNN_DEV acc_t weight(int64_t k, int64_t j) const { return static_cast<acc_t>(W[j * L.N + k]); }  // W^T
  // da_{t-1}[i] from dL/dh_{t-1} = gi, and step t-1's output gradient and output.
  NNRNN_DEV acc_t da_prev(int64_t t, int64_t b, acc_t gi, acc_t go, acc_t h) const {
    return valid(t - 1, b) ? (gi + go) * derivative_from_output<acc_t>(f, h) : acc_t(0);
  }
  NNRNN_DEV acc_t initial(int64_t b, int64_t k) const {
    const int64_t i = b * L.N + k, o = (L.T - 1) * L.B * L.N + i;
    return da_prev(L.T, b, static_cast<acc_t>(grad_h_n[i]), static_cast<acc_t>(grad_out[o]), static_cast<acc_t>(out[o]));
  }
  // The owner's side effects of the prologue (da_{T-1} itself: initial()).
  NNRNN_DEV void prologue(int64_t b, int64_t j) const {
    const int64_t i = b * L.N + j, o = (L.T - 1) * L.B * L.N + i;
    const acc_t d = initial(b, j);
    if (valid(L.T - 1, b)) db_rows[i] += d * bias_factor_from_output<acc_t>(f, static_cast<acc_t>(out[o]));
    dx[o] = static_cast<scalar_t>(d);
  }
  NNRNN_DEV acc_t* exchange(int64_t m) const { return da + ((m + 1) & 1) * L.B * L.N; }
  NNRNN_DEV Inputs fetch(int64_t s, int64_t b, int64_t j) const {
    const int64_t t = L.T - 1 - s, i = b * L.N + j;
    if (t == 0) return {g[i], acc_t(0), acc_t(0)};
    const int64_t o = (t - 1) * L.B * L.N + i;
    return {g[i], static_cast<acc_t>(grad_out[o]), static_cast<acc_t>(out[o])};
  }
  NNRNN_DEV acc_t finish(int64_t s, int64_t b, int64_t j, acc_t dot, acc_t, const Inputs& in) const {
    const int64_t t = L.T - 1 - s, i = b * L.N + j;
    const acc_t gi = valid(t, b) ? dot : in.g;  // a finished step passes dL/dh through
    if (t == 0) {
      grad_h0[i] = static_cast<scalar_t>(gi);
      return acc_t(0);
    }
    g[i] = gi;
    const acc_t d = da_prev(t, b, gi, in.grad_out, in.out);
    if (valid(t - 1, b)) db_rows[i] += d * bias_factor_from_output<acc_t>(f, in.out);
    dx[(t - 1) * L.B * L.N + i] = static_cast<scalar_t>(d);
    return d;
  }
};

// ---------------------------------------------------------------- the team kernel

// `Problem`: ForwardV2 or BackwardV2; `ex`: how the team exchanges A (one
// instantiation each: no registers spent on the other two). Every thread runs all T steps.
template <class Shape, class Problem, Exchange ex>
struct TeamKernel {
  Problem pb;

  template <class Env>
  NNRNN_DEV void operator()(Env& env) const {
    using acc_t = typename Problem::acc_t;
    constexpr int KT = Shape::KT, CT = Shape::CT, LANES = Shape::LANES, VEC = static_cast<int>(16 / sizeof(acc_t));
    static_assert(KT % VEC == 0, "a thread's k-chunk is whole 16-byte vectors");
    const LayoutV2& L = pb.L;
    const int C = L.team_blocks, stride = L.d.a_stride, RT = L.rows_per_tile;
    const int PC = L.d.p_cols, PS = L.d.p_stride, LC = L.d.lanes_c, LK = L.d.lanes_k, KW = L.d.k_warps;
    const int PRS = L.d.p_row_step, PCS = L.d.p_col_step;  // P: PC x PS, LC x PS
    const int q = env.block() % C, g = env.block() / C;  // a cluster is C consecutive blocks: q is its rank
    // 32-bit indices inside the block (B, N < 2^31); 64-bit offsets only into global memory.
    const int c0 = static_cast<int>(L.col_begin(q)), row0 = static_cast<int>(L.row_begin(g));
    const int ncols = static_cast<int>(L.col_begin(q + 1)) - c0, rows = static_cast<int>(L.row_begin(g + 1)) - row0;
    const int N = static_cast<int>(L.N), T = static_cast<int>(L.T);
    const int warp = env.thread() / LANES, lane = env.thread() % LANES;
    const int kq = (warp % KW) * LK + lane / LC;          // this thread's chunk of k
    const int col = (warp / KW) * LC * CT + lane % LC;    // its first column; the others LC apart
    const int k0 = kq * KT;

    acc_t* A = env.template shared<acc_t>();
    acc_t* P = A + L.d.a_elems;
    uint64_t* bars = reinterpret_cast<uint64_t*>(reinterpret_cast<unsigned char*>(A) + L.d.barrier_offset);
    const int slot_elems = L.d.slot_elems;  // 0: one slot (Grid)
    auto a_slot = [&](int m) { return A + (m & 1) * slot_elems; };  // where A_m is read
    // Grid: `warps_done` (shared) counts the block's warps that have written their
    // elements of a tile: the last one publishes it (exchange.h).
    const int tiles = (rows + RT - 1) / RT, warps = env.threads() / LANES;
    unsigned* warps_done = reinterpret_cast<unsigned*>(bars);

    // A_0 for the team's rows (every block computes all of it: no exchange), zero padding elsewhere.
    for (int i = env.thread(); i < L.d.a_elems; i += env.threads()) {
      const int slot = slot_elems ? i / slot_elems : 0, r = (slot_elems ? i % slot_elems : i) / stride, k = i % stride;
      A[i] = slot == 0 && r < rows && k < N ? pb.initial(row0 + r, k) : acc_t(0);
    }
    if constexpr (ex == Exchange::Grid)
      if (env.thread() == 0) *warps_done = 0;
    for (int i = env.thread(); i < L.d.p_elems; i += env.threads()) P[i] = acc_t(0);  // the slots no chunk writes
    if (ncols > 0)
      for (int i = env.thread(); i < rows * ncols; i += env.threads()) pb.prologue(row0 + i / ncols, c0 + i % ncols);
    acc_t w[KT][CT];  // this thread's piece of W, for all steps (loaded after the prologue: fewer live registers there)
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int i = 0; i < KT; ++i)
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int j = 0; j < CT; ++j)
        w[i][j] = col + j * LC < ncols && k0 + i < N ? pb.weight(k0 + i, c0 + col + j * LC) : acc_t(0);

    // Cluster: block p sends the team's rows x p's columns per step.
    auto expected_bytes = [&](int p) { return L.slice_bytes(rows, p, sizeof(acc_t)); };
    if constexpr (ex == Exchange::Cluster) {
      init_cluster_exchange(env, bars, C, expected_bytes);
    } else {
      env.sync_block();
    }

    for (int s = 0; s < T; ++s) {
      acc_t* As = a_slot(s);
      for (int tile = 0; tile < tiles; ++tile) {
        const int rt0 = tile * RT, trows = rows - rt0 < RT ? rows - rt0 : RT;
        acc_t* Pt = P + p_parity(ex, s, tiles, tile) * L.d.p_tile_elems;  // (one buffer: tile is 0)
        // This thread's element of the tile; its inputs are fetched first, so that
        // their latency overlaps the wait and the product.
        const int item = env.thread();
        const bool mine = ncols > 0 && item < trows * ncols;
        const int r = mine ? item / ncols : 0, c = mine ? item % ncols : 0;
        typename Problem::Inputs in{};
        if (mine) in = pb.fetch(s, row0 + rt0 + r, c0 + c);

        // Wait for A_s, which the team published during step s - 1: Cluster, all rows
        // at the first tile; Grid, tile by tile (each tile's rows were published as
        // soon as the producers had finished that tile, so the wait for tile 0 overlaps
        // the producers' later tiles).
        if (s > 0 && (rt0 == 0 || ex == Exchange::Grid)) {
          // The warp's part of k (LK chunks), and the producers it waits for (computed
          // here, not kept in registers across the step).
          const int wk0 = (warp % KW) * LK * KT;
          const int wk1 = N < wk0 + LK * KT ? N : wk0 + LK * KT;
          const int p_lo = producer_of(L, wk0), p_hi = producer_of(L, wk1 - 1);
          if constexpr (ex == Exchange::Cluster) {
            wait_cluster_slices(env, bars, s, C, p_lo, p_hi);
          } else if constexpr (ex == Exchange::Grid) {
            wait_grid_rows(env, pb.flags, g * C, p_lo, p_hi, rows_published(s - 1, rows, rt0 + trows));
            // This warp's part of the tile's rows of A_s into shared memory.
            const acc_t* src = pb.exchange(s) + static_cast<int64_t>(row0 + rt0) * N;
            acc_t* dst = As + rt0 * stride;
            if (L.N % VEC == 0) {  // rows are 16-byte aligned: vector copies
              const int vecs = (wk1 - wk0) / VEC;
              for (int e = lane; e < trows * vecs; e += LANES) {
                const int rr = e / vecs, k = wk0 + (e % vecs) * VEC;
                env.copy16_cg(dst + rr * stride + k, src + rr * N + k);
              }
            } else {
              for (int e = lane; e < trows * (wk1 - wk0); e += LANES) {
                const int rr = e / (wk1 - wk0), k = wk0 + e % (wk1 - wk0);
                dst[rr * stride + k] = env.load_cg(src + rr * N + k);
              }
            }
            env.sync_warp();  // the warp's copy complete before its lanes read it
          }
        }

        // P[r][column][kq] = sum over this thread's k of A[r][k] W[k][column]: two rows at
        // a time (two independent chains per column), then an odd last row with two
        // accumulators per column for alternate 16-byte vectors of k (half the chain: the
        // latency of a step with one row). Row pointers stepped, not recomputed.
        auto rows_product = [&](auto two_rows, const acc_t* a, acc_t* p) {
          constexpr bool pair = decltype(two_rows)::value;
          acc_t sum[2][CT];  // pair: [row][column]; one row: [parity of the vector of k][column]
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int j = 0; j < CT; ++j) sum[0][j] = sum[1][j] = acc_t(0);
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int i = 0; i < KT; i += VEC) {
            alignas(16) acc_t h[2][VEC];
            load16(h[0], a + i);
            if constexpr (pair) load16(h[1], a + stride + i);
#if defined(__CUDACC__)
#pragma unroll
#endif
            for (int v = 0; v < VEC; ++v)
#if defined(__CUDACC__)
#pragma unroll
#endif
              for (int j = 0; j < CT; ++j) {
                if constexpr (pair) {
                  sum[0][j] += h[0][v] * w[i + v][j];
                  sum[1][j] += h[1][v] * w[i + v][j];
                } else {
                  sum[(i / VEC) & 1][j] += h[0][v] * w[i + v][j];
                }
              }
          }
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int j = 0; j < CT; ++j) {
            if constexpr (pair) {
              p[j * PCS] = sum[0][j];
              p[PRS + j * PCS] = sum[1][j];
            } else {
              p[j * PCS] = sum[0][j] + sum[1][j];
            }
          }
        };
        const acc_t* a = As + rt0 * stride + k0;
        acc_t* p = Pt + col * PS + kq;
        for (int n = trows / 2; n > 0; --n, a += 2 * stride, p += 2 * PRS) rows_product(std::true_type{}, a, p);
        if (trows & 1) rows_product(std::false_type{}, a, p);
        env.sync_block();  // all partial sums of the tile written
        if constexpr (ex == Exchange::Cluster) {
          // Every warp has passed its wait for A_s: arm slot s & 1 for A_{s+2}, before
          // this block publishes A_{s+1} (no producer sends A_{s+2} before that).
          if (rt0 == 0 && s > 0 && s + 2 < T)
            arm_cluster_slot(env, bars, s & 1, C, expected_bytes);
        }

        if (mine) {
          // The element's partial sums, 16 bytes at a time into VEC sums, then those
          // pairwise: a fixed order (deterministic).
          const acc_t* pe = Pt + (r * PC + c) * PS;
          acc_t part[VEC] = {};
          for (int v = 0; v < L.d.p_vectors; ++v) {
            alignas(16) acc_t x[VEC];
            load16(x, pe + v * VEC);
#if defined(__CUDACC__)
#pragma unroll
#endif
            for (int u = 0; u < VEC; ++u) part[u] += x[u];
          }
#if defined(__CUDACC__)
#pragma unroll
#endif
          for (int half = VEC / 2; half >= 1; half /= 2)
#if defined(__CUDACC__)
#pragma unroll
#endif
            for (int u = 0; u < half; ++u) part[u] += part[u + half];
          const acc_t dot = part[0];
          const int b = row0 + rt0 + r, j = c0 + c;
          const acc_t v = pb.finish(s, b, j, dot, As[(rt0 + r) * stride + j], in);
          if (s + 1 < T) {  // publish A_{s+1}[b, j] to the team
            acc_t* dst = a_slot(s + 1) + (rt0 + r) * stride + j;
            if constexpr (ex == Exchange::Block) {
              *dst = v;
            } else if constexpr (ex == Exchange::Cluster) {
              uint64_t* bar = bars + ((s + 1) & 1) * C + q;
              for (int peer = 0; peer < C; ++peer) env.store_async_peer(dst, peer, v, bar);
            } else {
              pb.exchange(s + 1)[static_cast<int64_t>(b) * N + j] = v;
            }
          }
        }
        // Grid: the last warp of the block to write its elements of the tile publishes
        // the tile of A_{s+1}; the others go on to the next tile.
        if constexpr (ex == Exchange::Grid) {
          env.sync_warp();
          if (lane == 0 && last_warp_of_tile(env, warps_done, warps) && s + 1 < T)
            env.flag_publish(pb.flags + g * C + q, rows_published(s, rows, rt0 + trows));
        }
        // No block barrier between a tile's finish and the next tile's product: that
        // product writes the other P and reads rows of A_s the finish does not touch, so
        // one warp's finish overlaps another's product. After a step's last tile (Block,
        // Grid), every element of A_{s+1} written (and the Grid's one slot of A read)
        // before the next step reads (overwrites) them. Cluster: the next step reads A_{s+1}
        // after its mbarrier waits, and its first tile writes the other P.
        if (ex != Exchange::Cluster && tile + 1 == tiles) env.sync_block();
      }
    }
    // Why this ordering is enough (no barrier spans two steps' slots): A_{s+1} goes to
    // the slot that held A_{s-1}. A producer writes it only after it has waited for
    // every producer's part of A_s, which each wrote after its own step s - 1 had
    // read A_{s-1} (Grid: copied it) and passed a block barrier. (Grid: the same, tile
    // by tile: a tile's rows of A_{s+1} are written after every producer published that
    // tile's rows of A_s, each after copying that tile's rows of A_{s-1}.) For the same
    // reason no mbarrier is ever more than one phase ahead of its waiter.
    // Cluster: every store into this block was awaited above, but its own last stores into
    // its peers may still be in flight: no block exits before every peer has received them.
    if constexpr (ex == Exchange::Cluster) env.sync_cluster();
  }
};

}  // namespace nnrnn::kern
