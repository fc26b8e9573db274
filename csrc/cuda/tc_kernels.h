// The tensor-core persistent recurrence (design, cost model and accuracy:
// docs/tensor_cores.md), for float16 and bfloat16, and for float32 as TF32 where the
// user allows it. Written against kernel_env.h like kernels_v2.h, whose team
// structure, exchanges and problems (ForwardV2, BackwardV2) it shares: only the
// product differs, so the host emulation (../cpu/host_grid.h) runs this same source,
// with mma() emulated per lane (mma.h).
//
// A team (a slice of the batch rows) owns one whole copy of W, spread over its
// `team_blocks` blocks by output columns. Per step the product A_s Wop (A_s = h_{s-1}
// forward, da_t backward; Wop = W forward, W^T backward) is computed transposed,
//   D^T (columns j x rows b) = Wop^T (j x k) * A_s^T (k x b),
// so that the MMA's M is the block's columns (16 per m-tile), its N the batch rows
// (8 per n-tile, padded with zero rows) and its K the reduction. Warp (mt, kq) keeps
// the A fragments of Wop^T for m-tile mt and k-chunk kq (KT instructions' worth) in
// registers for the whole sequence, reads B fragments of A_s from shared memory
// (stored along k in the operand type: one 4-byte load per register), accumulates
// in float32 (two accumulators per n-tile: even and odd k-tiles, halving the
// dependent chain) and writes one float32 partial sum per element to P. After a
// block barrier the owner of a pair of adjacent elements adds the KQ partials in a
// fixed order (deterministic), runs the problem's pointwise step in float32, keeps
// the float32 state in S (the block's own elements) and publishes A_{s+1} rounded to
// the operand type (a 4- or 8-byte store per pair), to the team as kernel v2 does
// (Cluster: st.async into every peer's shared memory, counted on its mbarriers).
#pragma once

#include <cstdint>
#include <type_traits>

#include "kernels_v2.h"
#include "mma.h"

namespace nnrnn::kern {

constexpr int kTcMmaM = 16;  // columns per m-tile
constexpr int kTcMmaN = 8;   // batch rows per n-tile
constexpr int kTcMaxThreads = 512;  // the kernel's launch bound: up to 128 registers per thread (W's fragments)

// How the work is split; computed on the host (tc_plan.h), read by every thread.
struct TcLayout {
  int64_t T, B, N;
  Exchange exchange;
  int team_blocks;    // C: blocks of one team (the cluster size with Exchange::Cluster)
  int teams;          // G: block = g * C + q
  int rows_per_tile;  // rows multiplied between two block barriers: a multiple of 8
  int kt;             // instructions along k per warp (the kernel's KT)
  MmaKind kind;

  NNRNN_HD int k_inst() const { return kind == MmaKind::TF32 ? 8 : 16; }
  NNRNN_HD int operand_bytes() const { return kind == MmaKind::TF32 ? 4 : 2; }
  NNRNN_HD int k_chunk() const { return kt * k_inst(); }
  NNRNN_HD int k_chunks() const { return static_cast<int>((N + k_chunk() - 1) / k_chunk()); }
  // Pairs of operands in a row of A (an odd last column with its zero neighbour).
  NNRNN_HD int64_t row_pairs() const { return (N + 1) / 2; }
  // Column slices start at even columns (a pair of elements is published as one store).
  NNRNN_HD int64_t col_begin(int q) const {
    return q >= team_blocks ? N : 2 * (static_cast<int64_t>(q) * row_pairs() / team_blocks);
  }
  // Bytes block q publishes per step to each block of a team with `rows` rows: its
  // columns as pairs of operands (an odd last column with its zero neighbour).
  NNRNN_HD unsigned slice_bytes(int rows, int q) const {
    const int pairs = static_cast<int>((col_begin(q + 1) - col_begin(q) + 1) / 2);
    return static_cast<unsigned>(rows * pairs * 2 * operand_bytes());
  }
  NNRNN_HD int max_cols() const {
    int m = 0;
    for (int q = 0; q < team_blocks; ++q) {
      const int c = static_cast<int>(col_begin(q + 1) - col_begin(q));
      m = c > m ? c : m;
    }
    return m;
  }
  NNRNN_HD int m_tiles() const { return (max_cols() + kTcMmaM - 1) / kTcMmaM; }
  NNRNN_HD int warps() const { return m_tiles() * k_chunks(); }
  NNRNN_HD int threads() const { return 32 * warps(); }
  NNRNN_HD int grid() const { return teams * team_blocks; }
  NNRNN_HD int64_t row_begin(int g) const { return static_cast<int64_t>(g) * B / teams; }
  NNRNN_HD int max_rows() const { return static_cast<int>((B + teams - 1) / teams); }
  NNRNN_HD int a_rows() const { return (max_rows() + kTcMmaN - 1) / kTcMmaN * kTcMmaN; }
  // Row stride of A in elements: whole k-chunks (zero padded), then padded so that
  // the row stride in 4-byte words is 4 mod 32: the 32 lanes' B-fragment loads (8
  // rows x 4 words) fall in 32 different banks.
  NNRNN_HD int a_stride() const {
    const int words = k_chunks() * k_chunk() * operand_bytes() / 4;
    return (words + ((4 - words) % 32 + 32) % 32) * 4 / operand_bytes();
  }
  NNRNN_HD int slots() const { return exchange == Exchange::Grid ? 1 : 2; }
  NNRNN_HD int64_t slot_elems() const { return static_cast<int64_t>(a_rows()) * a_stride(); }
  // P's row stride: m-tiles x 16 columns plus 4 words, so that the accumulators'
  // stores (rows 2t and 2t + 1, columns g and g + 8) fall in different banks.
  NNRNN_HD int p_stride() const { return m_tiles() * kTcMmaM + 4; }
  // P: the partial sums of a tile (k_chunks x rows_per_tile x p_stride float32);
  // p_buffer_count() of them, as in kernel v2.
  NNRNN_HD int p_buffers() const { return p_buffer_count(exchange, max_rows(), rows_per_tile); }
  NNRNN_HD int64_t p_buffer_bytes() const {
    return (static_cast<int64_t>(k_chunks()) * rows_per_tile * p_stride() * 4 + 15) / 16 * 16;
  }
  // Shared memory: A (slots x a_rows x a_stride operands), S (max_rows x max_cols
  // float32), P (p_buffers), 2 x C mbarriers (Cluster) or the count of warps done
  // with a tile (Grid).
  NNRNN_HD int64_t s_offset() const { return (slots() * slot_elems() * operand_bytes() + 15) / 16 * 16; }
  NNRNN_HD int64_t p_offset() const { return s_offset() + (static_cast<int64_t>(max_rows()) * max_cols() * 4 + 15) / 16 * 16; }
  NNRNN_HD int64_t barrier_offset() const { return p_offset() + p_buffers() * p_buffer_bytes(); }
  NNRNN_HD int64_t shared_bytes() const {
    return barrier_offset() + exchange_sync_bytes(exchange, team_blocks);
  }

  // The functions above, evaluated once on the host (derive()): the kernel reads
  // them as parameters instead of computing them in registers beside W.
  struct Derived {
    int k_chunks, max_cols, row_pairs, a_stride, p_stride, slot_elems, s_offset, p_offset, p_buffer_bytes, barrier_offset;
  } d;
  void derive() {
    d = Derived{k_chunks(),
                max_cols(),
                static_cast<int>(row_pairs()),
                a_stride(),
                p_stride(),
                static_cast<int>(slot_elems()),
                static_cast<int>(s_offset()),
                static_cast<int>(p_offset()),
                static_cast<int>(p_buffer_bytes()),
                static_cast<int>(barrier_offset())};
  }
};

// Two adjacent operands as one store: 4 bytes (16-bit types) or 8 (TF32).
template <MmaKind kind>
struct OperandPair {
  using type = typename std::conditional<kind == MmaKind::TF32, uint64_t, uint32_t>::type;
  NNRNN_DEV static type pack(float lo, float hi) {
    using Op = MmaOperand<kind>;
    return static_cast<type>(Op::round(lo)) | (static_cast<type>(Op::round(hi)) << (8 * sizeof(typename Op::bits)));
  }
};

// `Problem`: ForwardV2<scalar_t, float> or BackwardV2<scalar_t, float> (its L holds
// T, B and N); KT: instructions along k per warp (the layout's kt); `ex`: how the
// team exchanges A (one instantiation each, as in kernel v2).
template <MmaKind kind, int KT, class Problem, Exchange ex>
struct TcTeamKernel {
  Problem pb;
  TcLayout L;
  // Grid: A_m in the operand type, two slots of B rows x row_pairs() pairs (A_m in slot
  // (m + 1) & 1, as the problem's float32 exchange): half the bytes from L2 per step.
  typename OperandPair<kind>::type* grid_operands = nullptr;

  template <class Env>
  NNRNN_DEV void operator()(Env& env) const {
    static_assert(std::is_same<typename Problem::acc_t, float>::value, "tensor cores accumulate in float32");
    using Op = MmaOperand<kind>;
    using bits = typename Op::bits;
    using Pair = OperandPair<kind>;
    constexpr int K = Op::K;
    constexpr bool prefetch = KT <= 8 || sizeof(typename Problem::Inputs) <= 2 * sizeof(float);
    const int N = static_cast<int>(L.N);  // 32-bit indices inside the block; 64-bit offsets into global memory
    const int C = L.team_blocks, KQ = L.d.k_chunks, stride = L.d.a_stride, RT = L.rows_per_tile;
    const int PS = L.d.p_stride, MC = L.d.max_cols;
    const int q = env.block() % C, g = env.block() / C;  // a cluster is C consecutive blocks: q is its rank
    const int c0 = static_cast<int>(L.col_begin(q)), row0 = static_cast<int>(L.row_begin(g));
    const int ncols = static_cast<int>(L.col_begin(q + 1)) - c0, rows = static_cast<int>(L.row_begin(g + 1)) - row0;
    const int pairs = (ncols + 1) / 2;
    const int warp = env.thread() / 32, lane = env.thread() % 32;
    const int kq = warp % KQ, mt = warp / KQ;  // both the same for the whole warp
    const int k0 = kq * KT * K;
    const int kend = static_cast<int>(N < k0 + KT * K ? N : k0 + KT * K);
    const bool computes = mt * kTcMmaM < ncols;
    const int p_lo = producer_of(L, k0), p_hi = producer_of(L, kend - 1);

    unsigned char* smem = env.template shared<unsigned char>();
    bits* A = reinterpret_cast<bits*>(smem);
    float* S = reinterpret_cast<float*>(smem + L.d.s_offset);
    uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L.d.barrier_offset);
    constexpr int slots = ex == Exchange::Grid ? 1 : 2;
    const int slot_elems = L.d.slot_elems;
    auto a_slot = [&](int64_t m) { return A + (slots == 2 ? (m & 1) * slot_elems : 0); };
    // Grid: where A_m goes (pairs of operands), and the count of the block's warps done
    // with a tile (exchange.h; its address computed where it is used, as P's below).
    auto grid_slot = [&](int64_t m) { return grid_operands + ((m + 1) & 1) * L.B * L.d.row_pairs; };
    // A step's number of tiles, computed where it is used (as a tile's P address below,
    // and the tile's index from rt0): values kept across the product spill in the KT = 16
    // kernels (the static check).
    auto tile_count = [&] { return (rows + RT - 1) / RT; };
    auto warps_done = [&] { return reinterpret_cast<unsigned*>(smem + L.d.barrier_offset); };

    // This warp's fragments of Wop^T: w[i] is columns c0 + mt*16 + [0, 16) x k in
    // k0 + i*K + [0, K), zero outside the matrix. In registers for all steps. Built
    // one fragment per iteration of a loop that is not unrolled, shifting the array
    // (constant indices keep it in registers), so that the loads of all KT fragments
    // are not in flight at once: the kernel's register count is set by its steps.
    MmaA w[KT];
#if defined(__CUDACC__)
#pragma unroll 1
#endif
    for (int i = 0; i < KT; ++i) {
      const MmaA f = mma_make_a<kind>(lane, [this, mt, k0, i, ncols, N, c0](int m, int k) {  // (copies, as [=])
        const int j = mt * kTcMmaM + m;
        const int kk = k0 + i * K + k;
        return j < ncols && kk < N ? pb.weight(kk, c0 + j) : 0.0f;
      });
#if defined(__CUDACC__)
#pragma unroll
#endif
      for (int u = 0; u + 1 < KT; ++u) w[u] = w[u + 1];
      w[KT - 1] = f;
    }

    // A_0 (rounded) for the team's rows, zero padding in both slots; S: the float32
    // A_0 of the block's own elements; the problem's prologue.
    for (int i = env.thread(); i < slots * slot_elems; i += env.threads()) {
      const int slot = i / slot_elems, r = (i % slot_elems) / stride, k = i % stride;
      A[i] = slot == 0 && r < rows && k < N ? Op::round(pb.initial(row0 + r, k)) : bits(0);
    }
    for (int i = env.thread(); i < rows * ncols; i += env.threads()) {
      const int r = i / ncols, c = i % ncols;
      S[r * MC + c] = pb.initial(row0 + r, c0 + c);
      pb.prologue(row0 + r, c0 + c);
    }
    // Cluster: block p sends the team's rows x p's columns (as pairs) per step.
    auto expected_bytes = [&](int p) { return L.slice_bytes(rows, p); };
    if constexpr (ex == Exchange::Cluster) {
      init_cluster_exchange(env, bars, C, expected_bytes);
    } else {
      if (ex == Exchange::Grid && env.thread() == 0) *warps_done() = 0;
      env.sync_block();
    }

    for (int64_t s = 0; s < L.T; ++s) {
      bits* As = a_slot(s);
      for (int rt0 = 0; rt0 < rows; rt0 += RT) {
        const int trows = rows - rt0 < RT ? rows - rt0 : RT;
        auto p_tile = [&] {  // the tile's P (p_parity)
          return reinterpret_cast<float*>(smem + L.d.p_offset +
                                          p_parity(ex, static_cast<int>(s), tile_count(), rt0 / RT) * L.d.p_buffer_bytes);
        };
        // This thread's first pair of the tile: its inputs are fetched first, so that
        // their latency overlaps the wait and the product (as in kernel v2). Not where
        // 16 instructions' W (64 registers) leaves no room for them across the product:
        // the backward's three inputs per element spilled there (the static check).
        typename Problem::Inputs first[2] = {};
        if (prefetch && env.thread() < trows * pairs) {
          const int r = env.thread() / pairs, c = 2 * (env.thread() % pairs);
          first[0] = pb.fetch(s, row0 + rt0 + r, c0 + c);
          if (c + 1 < ncols) first[1] = pb.fetch(s, row0 + rt0 + r, c0 + c + 1);
        }
        // Wait for A_s, which the team published during step s - 1 (as kernel v2):
        // Cluster, all rows at the first tile; Grid, tile by tile.
        if (s > 0 && (rt0 == 0 || ex == Exchange::Grid)) {
          if constexpr (ex == Exchange::Cluster) {
            wait_cluster_slices(env, bars, s, C, p_lo, p_hi);
          } else if constexpr (ex == Exchange::Grid) {
            wait_grid_rows(env, pb.flags, env.block() - q, p_lo, p_hi, rows_published(s - 1, rows, rt0 + trows));
            // The tile's rows of this warp's part of k (k0 is even), pair by pair; for
            // odd N the last pair's second operand is column N, a zero.
            const int pk0 = k0 / 2, width = (kend + 1) / 2 - pk0, row_pairs = L.d.row_pairs;
            const typename Pair::type* src = grid_slot(s) + static_cast<int64_t>(row0 + rt0) * row_pairs + pk0;
            auto* dst = reinterpret_cast<typename Pair::type*>(As + rt0 * stride) + pk0;
            for (int e = lane; e < trows * width; e += 32) {
              const int rr = e / width, k = e % width;
              dst[rr * (stride / 2) + k] = env.load_cg(src + static_cast<int64_t>(rr) * row_pairs + k);
            }
            env.sync_warp();  // the warp's copy complete before its lanes read it
          }
        }

        // P[kq][r][column] = sum over this warp's k of A_s[r][k] Wop[k][column].
        if (computes) {
#if defined(__CUDACC__)
#pragma unroll 1
#endif
          for (int n0 = 0; n0 < trows; n0 += kTcMmaN) {
            MmaC acc[2] = {};
            const bits* src = As + (rt0 + n0) * stride + k0;
#if defined(__CUDACC__)
#pragma unroll
#endif
            for (int i = 0; i < KT; ++i) mma<kind>(env, acc[i & 1], w[i], mma_load_b<kind>(lane, src + i * K, stride));
            float* dst = p_tile() + (kq * RT + n0) * PS + mt * kTcMmaM;
            for (int e = 0; e < 4; ++e) {
              const MmaCoord c = mma_c_coord(lane, e);  // row: column of the block; col: batch row
              dst[c.col * PS + c.row] = acc[0].r[e] + acc[1].r[e];
            }
          }
        }
        env.sync_block();  // all partial sums of the tile written
        if constexpr (ex == Exchange::Cluster) {
          // Every warp has passed its wait for A_s: arm slot s & 1 for A_{s+2}, before
          // this block publishes A_{s+1} (no producer sends A_{s+2} before that).
          if (rt0 == 0 && s > 0 && s + 2 < L.T)
            arm_cluster_slot(env, bars, static_cast<int>(s & 1), C, expected_bytes);
        }

        for (int item = env.thread(); item < trows * pairs; item += env.threads()) {
          const int r = item / pairs, c = 2 * (item % pairs);
          const bool two = c + 1 < ncols, prefetched = prefetch && item == env.thread();
          const int64_t b = row0 + rt0 + r, j = c0 + c;
          float* state = S + (rt0 + r) * MC + c;
          auto element = [&](int h, const typename Problem::Inputs& in) {  // column c + h
            float dot = 0.0f;  // the partial sums in a fixed order
            for (int kk = 0; kk < KQ; ++kk) dot += p_tile()[(kk * RT + r) * PS + c + h];
            const float v = pb.finish(s, b, j + h, dot, state[h], in);
            state[h] = v;
            return v;
          };
          const float v0 = element(0, prefetched ? first[0] : pb.fetch(s, b, j));
          const float v1 = two ? element(1, prefetched ? first[1] : pb.fetch(s, b, j + 1)) : 0.0f;
          if (s + 1 < L.T) {  // publish A_{s+1}[b, j and j + 1] to the team
            // The pair's second element is column N (zero padding) when ncols is odd.
            const typename Pair::type packed = Pair::pack(v0, v1);
            if constexpr (ex == Exchange::Grid) {
              grid_slot(s + 1)[b * L.d.row_pairs + j / 2] = packed;
            } else {
              auto* dst = reinterpret_cast<typename Pair::type*>(a_slot(s + 1) + (rt0 + r) * stride + j);
              if constexpr (ex == Exchange::Block) {
                *dst = packed;
              } else {
                uint64_t* bar = bars + ((s + 1) & 1) * C + q;
                for (int peer = 0; peer < C; ++peer) env.store_async_peer(dst, peer, packed, bar);
              }
            }
          }
        }
        // Grid: the last warp of the block to write its elements of the tile publishes
        // its rows of A_{s+1} (kernel v2's ordering argument: a warp's writes, its lane
        // 0's arrival, the last arrival's release to the team).
        if constexpr (ex == Exchange::Grid) {
          env.sync_warp();
          if (lane == 0 && last_warp_of_tile(env, warps_done(), env.threads() / 32) && s + 1 < L.T)
            env.flag_publish(pb.flags + env.block(), rows_published(s, rows, rt0 + trows));  // g x C + q
        }
        // No block barrier between a tile's finish and the next tile's product (the other
        // P, rows of A the finish does not touch), as in kernel v2. After a step's last
        // tile (Block, Grid), all of A_{s+1} written (Grid: this step's copies of A read)
        // before the next step reads (overwrites) A. Cluster: A's slots are written by the
        // team only after the mbarrier waits: A_{s+2} goes into A_s's slot after every peer
        // has received all of this block's A_{s+1}, whose last rows are published after the
        // first barrier of the step's last tile, itself after every read of A_s.
        if (ex != Exchange::Cluster && rt0 + RT >= rows) env.sync_block();
      }
    }
    // Cluster: every store into this block was awaited above, but its own last stores into
    // its peers may still be in flight: no block exits before every peer has received them.
    if constexpr (ex == Exchange::Cluster) env.sync_cluster();
  }
};

}  // namespace nnrnn::kern
