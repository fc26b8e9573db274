// The team exchange's protocol, shared by kernel v2 (kernels_v2.h) and the tensor-core
// kernel (tc_kernels.h): how a team's blocks hand each other the next step's operand
// A_{s+1}, and how a block's tiles of a step share the buffers of partial sums P.
// Written against kernel_env.h, so that the host emulation runs it too.
//
// A team is C blocks (block g x C + q of the grid: team g, rank q), each owning a slice
// of A's columns. Exchanges:
//   Block:   one block per team; A is the block's own shared memory.
//   Cluster: one thread-block cluster per team (sm_90); a block st.async's its slice of
//            A_{s+1} into every peer's shared memory, counted in bytes on the peer's
//            mbarrier of that producer and slot (A_m in slot m & 1).
//   Grid:    the team's blocks anywhere in a cooperative grid; slices go through global
//            memory, and each producer has a step counter of the rows it has published.
// The mutation check (tools/mutation_check.py) runs this file's mutants with each
// kernel's emulation tests.
#pragma once

#include <cstdint>

#include "kernel_env.h"

namespace nnrnn::kern {

enum class Exchange : int32_t { Block = 0, Cluster = 1, Grid = 2 };

// P, the partial sums of a row tile: two buffers where a team's rows take several
// tiles, and always with the Cluster exchange, so that no block barrier separates a
// tile's finish, which reads one, from the next tile's product (of this step or,
// Cluster, the next), which writes the other. Tile `tile` of step s takes the buffer
// of its parity: within a step, tile; Cluster, its place in the sequence (s x tiles +
// tile). The tile after next writes the same buffer only after its own first barrier,
// which every thread reaches after this tile's finish.
NNRNN_HD int p_buffer_count(Exchange ex, int max_rows, int rows_per_tile) {
  return ex == Exchange::Cluster || max_rows > rows_per_tile ? 2 : 1;
}
NNRNN_HD int p_parity(Exchange ex, int s, int tiles, int tile) {
  return ex == Exchange::Cluster ? ((s & tiles) + tile) & 1 : tile & 1;
}
// Block barriers per step: one per tile (its partial sums written), and after the
// step's last tile, except Cluster (the next step waits on its mbarriers instead).
NNRNN_HD int team_barriers(Exchange ex, int tiles) { return tiles + (ex == Exchange::Cluster ? 0 : 1); }
// Shared memory after P for the exchange's synchronisation: 2 x C mbarriers (Cluster),
// the count of warps done with a tile (Grid).
NNRNN_HD int exchange_sync_bytes(Exchange ex, int team_blocks) {
  return ex == Exchange::Cluster ? 2 * team_blocks * 8 : ex == Exchange::Grid ? 8 : 0;
}

// The block of the team that owns column k (kernel v2's LayoutV2, or TcLayout).
template <class TeamLayout>
NNRNN_HD int producer_of(const TeamLayout& L, int64_t k) {
  int q = static_cast<int>(k * L.team_blocks / L.N);  // col_begin(q) <= k up to rounding
  while (q + 1 < L.team_blocks && L.col_begin(q + 1) <= k) ++q;
  while (q > 0 && L.col_begin(q) > k) --q;
  return q;
}

// ---------------------------------------------------------------- Cluster

// Barrier [slot][p] of each block (bars[slot x C + p]) counts the bytes block p sends it
// per step, bytes(p); thread p arms it, one phase ahead of its use.
template <class Env, class Bytes>
NNRNN_DEV void arm_cluster_slot(Env& env, uint64_t* bars, int slot, int C, const Bytes& bytes) {
  for (int p = env.thread(); p < C; p += env.threads()) env.mbar_expect(bars + slot * C + p, bytes(p));
}
// Before the first step: the 2 x C barriers initialised and their first phases armed
// (A_1 in slot 1, A_2 in slot 0) before any peer stores into this block. A slot is armed
// again (for A_{s+2}) once every warp of the block has passed its wait for A_s.
template <class Env, class Bytes>
NNRNN_DEV void init_cluster_exchange(Env& env, uint64_t* bars, int C, const Bytes& bytes) {
  if (env.thread() == 0)
    for (int i = 0; i < 2 * C; ++i) env.mbar_init(bars + i, 1);
  env.sync_block();
  arm_cluster_slot(env, bars, 1, C, bytes);
  arm_cluster_slot(env, bars, 0, C, bytes);
  env.sync_cluster();
}
// Wait for producers p_lo to p_hi's slices of A_s (s >= 1): slot s & 1, whose phase
// ((s - 1) >> 1) & 1 is the one A_s completes (A_1 and A_2 complete phase 0, and so on).
template <class Env>
NNRNN_DEV void wait_cluster_slices(Env& env, uint64_t* bars, int64_t s, int C, int p_lo, int p_hi) {
  for (int p = p_lo; p <= p_hi; ++p) env.mbar_wait(bars + (s & 1) * C + p, static_cast<uint32_t>(((s - 1) >> 1) & 1));
}

// ---------------------------------------------------------------- Grid

// A producer's step counter counts the rows of A it has published: once rows
// [0, row_end) of A_{s+1} are out (at step s), s x rows + row_end (every block of a team
// has the same rows, published tile by tile).
NNRNN_HD unsigned long long rows_published(int64_t s, int rows, int row_end) {
  return static_cast<unsigned long long>(s) * rows + row_end;
}
// Wait until producers p_lo to p_hi of the team whose first block is `first` (their
// counters: flags[first + p]) have published `count` (rows_published).
template <class Env>
NNRNN_DEV void wait_grid_rows(Env& env, unsigned long long* flags, int first, int p_lo, int p_hi,
                              unsigned long long count) {
  for (int p = p_lo; p <= p_hi; ++p) env.flag_wait(flags + (first + p), count);
}
// Whether this warp is the block's last to have written its elements of a tile (it then
// publishes the tile to the team). Lane 0 of every warp calls it once per tile, after a
// warp barrier: a warp's writes come before its arrival (release, block scope), every
// arrival before the last one's acquire, which comes before its release to the team:
// causality is transitive in the PTX memory model. The last warp sets the count back
// to 0: no warp arrives for the next tile before passing the block barrier after that
// tile's product (or the step's), which the last warp reaches after this.
template <class Env>
NNRNN_DEV bool last_warp_of_tile(const Env& env, unsigned* warps_done, int warps) {
  if (env.arrive(warps_done) + 1 != static_cast<unsigned>(warps)) return false;
  *warps_done = 0;
  return true;
}

}  // namespace nnrnn::kern
