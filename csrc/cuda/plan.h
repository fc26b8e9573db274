// The choice of path for the CUDA recurrence, by a cost model (docs/cuda.md,
// "Cost model"): kernel v2 (kernels_v2.h), kernel v1 (kernels.h) or the fallback
// (a GEMM per step). Host code only, shared by the CUDA side (recurrence_cuda.cu,
// with the device's figures), the emulation's emulated_plan op and the static
// check (benchmarks/static_check.py, with an H100's figures).
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <string>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include "kernels.h"
#include "kernels_v2.h"

namespace nnrnn::kern {

struct Plan {
  bool persistent = false;  // false: the fallback
  int version = 0;          // persistent kernel version: 1, 2, or 3 (the tensor-core path, tc_plan.h)
  // The split: col_groups blocks share a row group's columns, row_groups groups of rows.
  // v1: one grid barrier over all of them; v2: col_groups = blocks of a team, row_groups = teams.
  int col_groups = 1, row_groups = 1;
  int threads = 1, rows_per_tile = 1;
  int64_t shared_bytes = 0;             // per block
  Exchange exchange = Exchange::Block;  // v2 and the tensor-core path
  int kt = 0;                           // the tensor-core path (version 3): its kernel's KT
  double forward_us = 0, backward_us = 0;  // the model's prediction per step
  std::string reason;  // why the fallback (or why a kernel does not fit)
};

// A team layout forced by NNRNN_CUDA_TEAMS="<exchange>:<C>" or "<exchange>:<C>x<G>"
// (exchange block, cluster or grid; C blocks per team; G teams, else the model's): kernel
// v2 and the tensor-core kernel then plan only such layouts (rows per tile and KT still the
// model's), so that the GPU check can time each exchange on its own (benchmarks/gpu_phases.py,
// "exchange"). Which kernel stays NNRNN_CUDA_KERNEL's; where it has no such layout, its
// reason says so. A malformed spec is an error.
struct TeamOverride {
  std::string spec;  // "" when unset
  Exchange exchange = Exchange::Block;
  int team_blocks = 0, teams = 0;  // teams 0: any
  bool allows(Exchange ex, int C) const { return spec.empty() || (ex == exchange && C == team_blocks); }
  bool allows_teams(int G) const { return spec.empty() || teams == 0 || G == teams; }
  // The planner's reason when no layout of the kind fits.
  std::string refusal(const std::string& kernel) const {
    return kernel + ": no layout fits NNRNN_CUDA_TEAMS=" + spec;
  }
};

inline TeamOverride parse_team_override(const std::string& spec) {
  TeamOverride o;
  o.spec = spec;
  if (spec.empty()) return o;
  const auto colon = spec.find(':');
  const std::string name = spec.substr(0, colon == std::string::npos ? spec.size() : colon);
  const std::string size = colon == std::string::npos ? std::string() : spec.substr(colon + 1);
  int c = 0, g = 0, used = 0;  // "<C>x<G>" (G >= 1), or "<C>" (G = 0: the model's)
  const int whole = static_cast<int>(size.size());
  const bool both = std::sscanf(size.c_str(), "%dx%d%n", &c, &g, &used) == 2 && used == whole && g >= 1;
  const bool one = !both && std::sscanf(size.c_str(), "%d%n", &c, &used) == 1 && used == whole;
  if (one) g = 0;
  const bool known = name == "block" || name == "cluster" || name == "grid";
  TORCH_CHECK_VALUE(known && (both || one) && c >= 1,
                    "NNRNN_CUDA_TEAMS must be <exchange>:<blocks per team>[x<teams>] with exchange block, cluster "
                    "or grid (e.g. cluster:16, grid:8x2), got '", spec, "'");
  o.exchange = name == "block" ? Exchange::Block : name == "cluster" ? Exchange::Cluster : Exchange::Grid;
  TORCH_CHECK_VALUE(o.exchange != Exchange::Block || c == 1, "NNRNN_CUDA_TEAMS=", spec,
                    ": the block exchange has one block per team");
  TORCH_CHECK_VALUE(o.exchange != Exchange::Cluster || c == 2 || c == 4 || c == 8 || c == 16, "NNRNN_CUDA_TEAMS=",
                    spec, ": clusters have 2, 4, 8 or 16 blocks");
  TORCH_CHECK_VALUE(o.exchange != Exchange::Grid || c >= 2, "NNRNN_CUDA_TEAMS=", spec,
                    ": the grid exchange has 2 or more blocks per team");
  o.team_blocks = c;
  o.teams = g;
  return o;
}

// NNRNN_CUDA_TEAMS, parsed ("" when unset).
inline TeamOverride team_override() {
  const char* v = std::getenv("NNRNN_CUDA_TEAMS");
  return parse_team_override(v == nullptr ? std::string() : std::string(v));
}

inline std::array<int, 17> filled(int v) {
  std::array<int, 17> a{};
  a.fill(v);
  return a;
}

// What the plan knows of a device: attributes and occupancy on the GPU; the
// defaults are an H100 SXM's (132 SMs, 227 KB of shared memory per block).
struct DeviceModel {
  int sms = 132;
  int64_t smem_per_block = 232448, smem_per_sm = 233472;
  int regs_per_sm = 65536, max_threads_per_sm = 2048;
  bool clusters = true;  // sm_90 or later
  int max_cluster = 16;  // 16 where the non-portable size is allowed, else 8
  // Clusters of each size (index) that can be resident at once; -1: unknown, estimated as
  // sms / size (16: 7, an H100's GPCs). The CUDA side fills it from cudaOccupancyMaxActiveClusters.
  std::array<int, 17> active_clusters = filled(-1);
  int v2_regs = 128;  // registers per thread of the v2 kernels (120 to 128 by the static check; the GPU's own)
  bool cooperative = true;
};

// Constants of the model: estimates for an H100 SXM at 1.755 GHz, each to be
// checked by the first GPU run (docs/cuda.md lists where each comes from).
struct CostConstants {
  double clock_ghz = 1.755;
  double block_barrier_us = 0.03;     // __syncthreads with up to 32 warps
  double cluster_exchange_us = 0.25;  // st.async into a peer's shared memory until its waiter wakes
  double grid_exchange_us = 1.0;      // release store to L2, the poller's acquire, L2 loads
  double grid_barrier_us = 1.5;       // v1's barrier over the whole grid (the review's estimate)
  double launch_us = 5.0;             // one op of the fallback's host loop (ATen dispatch, launch, a view)
  double l2_bytes_per_us = 5.5e6;     // L2 to SMs, all SMs together (5.5 TB/s)
  double dsmem_bytes_per_clock = 32;  // stores from one SM into peers' shared memory
  double gemm_fma_per_us = 25e6;      // cuBLAS SGEMM/DGEMM, large (50 TFLOP/s)
  double issue_efficiency = 0.8;      // achieved fraction of the instruction-throughput bound
};

inline int active_clusters(const DeviceModel& d, int size) {
  if (size < 1 || size > 16) return 0;
  if (d.active_clusters[size] >= 0) return d.active_clusters[size];
  return size == 16 ? std::min(7, d.sms / 16) : d.sms / size;
}

// Blocks of `threads` threads and `smem` bytes that fit on one SM.
inline int blocks_per_sm(const DeviceModel& d, int threads, int64_t smem, int regs) {
  int n = std::min(32, d.max_threads_per_sm / threads);
  n = std::min<int64_t>(n, d.regs_per_sm / (static_cast<int64_t>(threads) * regs));
  n = std::min<int64_t>(n, d.smem_per_sm / (smem + 1024));  // 1 KB reserved per block
  return std::max(n, 0);
}

inline LayoutV2 v2_layout(int64_t T, int64_t B, int64_t N, const Plan& p, int kt, int ct, int lanes) {
  return LayoutV2{T, B, N, p.exchange, p.col_groups, p.row_groups, p.rows_per_tile, kt, ct, lanes, {}};
}
// The layout on the GPU (DeviceTileShape).
inline LayoutV2 device_v2_layout(int64_t B, int64_t N, int64_t acc, const Plan& p) {
  return v2_layout(1, B, N, p, v2_kt(acc), kV2Columns, kV2Lanes);
}

struct StepCost {
  double forward_us, backward_us;
};

// dW = sum_t h_{t-1}^T da_t after the backward's loop: one GEMM, per step.
inline double dw_gemm_us(int64_t B, int64_t N, const CostConstants& k) {
  return static_cast<double>(B) * N * N / k.gemm_fma_per_us;
}

// A step of a team kernel from its work (product, finish, barriers) and its exchange's
// latency. Block and Cluster: the team waits for all of A_s before its first tile. Grid:
// tile by tile, each published as soon as it is done, so a tile's exchange overlaps the
// block's other tiles: the step takes its work, or the exchange and the largest tile's
// share of the work (RT of R rows), whichever is longer.
inline double team_step_us(Exchange ex, double exchange, double work, int RT, int R) {
  return ex == Exchange::Grid ? std::max(work, exchange + work * std::min(RT, R) / R) : exchange + work;
}

// Wavefronts of one warp's store of partial sums into P (one column of its lanes'
// register tiles): lane (c, kq) writes element c's slot kq, p_stride values apart; the
// most 4-byte words that fall into one of the 32 banks.
inline int p_store_wavefronts(const LayoutV2& L, int64_t acc) {
  const int words = static_cast<int>(acc / 4), stride = L.p_stride(acc) * words;
  std::array<int, 32> bank{};
  for (int lane = 0; lane < L.lanes; ++lane)
    for (int i = 0; i < words; ++i) ++bank[((lane % L.lanes_c()) * stride + (lane / L.lanes_c()) * words + i) % 32];
  return *std::max_element(bank.begin(), bank.end());
}

// Kernel v2, per step (docs/cuda.md): the exchange's latency, then the product
// (bound by FMA issue, shared-memory wavefronts or one warp's dependent chain),
// the reduction and pointwise finish, a block barrier per row tile and one per step.
inline StepCost v2_cost(int64_t B, int64_t N, int64_t acc, const Plan& p, const DeviceModel& d,
                        const CostConstants& k = CostConstants()) {
  const LayoutV2 L = device_v2_layout(B, N, acc, p);
  const int KT = L.kt, CT = L.ct, vec = static_cast<int>(16 / acc), warps = L.threads() / kV2Lanes;
  const int R = L.max_rows(), RT = L.rows_per_tile, tiles = (R + RT - 1) / RT;
  const double fma_rate = acc == 8 ? 2.0 : 4.0;  // warp FMA instructions per clock and SM
  // Per warp and row: KT x CT FMAs, KT / vec 16-byte loads (one wavefront each:
  // the lanes read lanes_k addresses) and CT stores of partial sums; per pair of rows
  // kV2PairOverhead instructions besides FMAs and loads (an odd last row counted as a
  // pair). Shared memory serves the loads' and the stores' wavefronts.
  const int pairs = R / 2, odd = R % 2;
  const double fma = static_cast<double>(warps) * R * KT * CT, lds = static_cast<double>(warps) * R * KT / vec;
  const double other = static_cast<double>(warps) * (pairs + odd) * kV2PairOverhead;
  const double wavefronts = lds + static_cast<double>(warps) * R * CT * p_store_wavefronts(L, acc);
  // Blocks sharing one SM (Block exchange, more teams than SMs) share its throughput.
  const int resident = std::max(1, blocks_per_sm(d, L.threads(), L.shared_bytes(acc), d.v2_regs));
  const int per_sm = static_cast<int>(std::min<int64_t>(resident, (L.grid() + d.sms - 1) / d.sms));
  int64_t capacity = static_cast<int64_t>(resident) * d.sms;
  if (p.exchange == Exchange::Cluster) capacity = static_cast<int64_t>(active_clusters(d, L.team_blocks)) * L.team_blocks;
  const double waves = std::ceil(static_cast<double>(L.grid()) / std::max<int64_t>(capacity, 1));
  // The finish of a tile: each element's owner adds its partial sums, 16 bytes at a
  // time into vec sums, then those pairwise: the tile's warps issue kV2FinishPerChunk*
  // instructions per chunk and 4 shared-memory wavefronts per 16-byte load (the odd
  // p_stride spreads a warp's loads over all the banks); then the activation and the
  // stores. No barrier separates a tile's finish from the next tile's product: all but
  // the last tile's finish add their instructions and wavefronts to the product's bounds;
  // the last one takes its chain of dependent adds, its instructions or its wavefronts,
  // whichever is longest, after the product.
  const int vectors = L.p_vectors(acc);
  const double per_chunk = acc == 8 ? kV2FinishPerChunkDouble : kV2FinishPerChunkFloat;
  const double finish_warps = std::ceil(static_cast<double>(std::min(RT, R)) * L.max_cols() / kV2Lanes);
  const double finish_issue = finish_warps * vectors * vec * per_chunk / 4.0, finish_waves = finish_warps * vectors * 4.0;
  const double throughput = std::max({fma / fma_rate, (fma + lds + other) / 4.0 + (tiles - 1) * finish_issue,
                                      wavefronts + (tiles - 1) * finish_waves}) /
                            k.issue_efficiency;
  const double fma_latency = acc == 8 ? 8.0 : 4.0;
  // The dependent chains, one pair of rows after another: KT FMAs per pair (its two rows'
  // chains run side by side); an odd last row KT / 2 and the add of its two accumulators.
  const double chain = pairs * (KT * fma_latency + 30.0) + odd * ((KT / 2 + 1) * fma_latency + 30.0);
  const double partials = std::max((vectors + std::log2(vec)) * fma_latency,
                                   std::max(finish_issue, finish_waves) * per_sm / k.issue_efficiency);
  double finish = partials + 150.0;
  double exchange = 0, copy = 0;
  if (p.exchange == Exchange::Cluster) {
    finish += static_cast<double>(R) * L.max_cols() * L.team_blocks * acc / k.dsmem_bytes_per_clock;
    exchange = k.cluster_exchange_us;
  } else if (p.exchange == Exchange::Grid) {
    exchange = k.grid_exchange_us;
    copy = static_cast<double>(L.grid()) * R * N * acc / k.l2_bytes_per_us;  // every block reads its rows of A
  }
  const double clock_mhz = k.clock_ghz * 1e3;
  // Grid: a warp starts its product as soon as its own chunk has arrived, so the
  // copy from L2 and the product overlap (the model takes the longer of the two).
  const double product = std::max(std::max(throughput * per_sm, chain) / clock_mhz, copy);
  const double work = product + finish / clock_mhz + team_barriers(p.exchange, tiles) * k.block_barrier_us;
  const double step = team_step_us(p.exchange, exchange, work, RT, R);
  // The backward's finish reads two more inputs and writes three outputs: 10% more.
  return {step * waves, 1.1 * step * waves + dw_gemm_us(B, N, k)};
}

// Kernel v1, per step: one grid barrier, staging the block's rows of A, and the
// dot products with two 4-byte shared loads per FMA (the review's reading of its SASS).
inline StepCost v1_cost(int64_t B, int64_t N, const Plan& p, const CostConstants& k = CostConstants()) {
  const double rows = std::ceil(static_cast<double>(B) / p.row_groups), cols = std::ceil(static_cast<double>(N) / p.col_groups);
  const double tiles = std::ceil(rows / p.rows_per_tile);
  const double fma_instr = rows * cols * N / 32.0;  // warp instructions
  const double product = std::max(fma_instr * 5 / 4.0, fma_instr * 2);  // 5 instructions per FMA; 2 wavefronts
  const double staging = tiles * (600.0 + rows * N / p.threads * 6);    // an L2 round trip, div/load/store
  const double step = k.grid_barrier_us + (product + staging) / (k.clock_ghz * 1e3) + 2 * tiles * k.block_barrier_us;
  return {step, 1.1 * step + dw_gemm_us(B, N, k)};
}

// The fallback, per step: a GEMM and a pointwise kernel (forward); the backward
// adds the same again, then dW.
inline StepCost fallback_cost(int64_t B, int64_t N, const CostConstants& k = CostConstants()) {
  const double step = 2 * k.launch_us + static_cast<double>(B) * N * N / k.gemm_fma_per_us;
  return {step, step + dw_gemm_us(B, N, k)};
}

// The fastest v2 plan by the model for (N, B) with accumulation type of acc_size
// bytes, or persistent = false and why none fits.
inline Plan choose_v2_plan(int64_t N, int64_t B, int64_t acc, const DeviceModel& d,
                           const TeamOverride& only = TeamOverride(), const CostConstants& k = CostConstants()) {
  Plan best;
  best.reason = only.spec.empty() ? "kernel v2: no team layout fits" : only.refusal("kernel v2");
  auto consider = [&](Exchange ex, int C) {
    if (C > N || !only.allows(ex, C)) return;
    Plan p;
    p.persistent = true;
    p.version = 2;
    p.exchange = ex;
    p.col_groups = C;
    const LayoutV2 base = device_v2_layout(B, N, acc, p);
    if (base.threads() > kV2MaxThreads) return;
    p.threads = base.threads();
    const int rt_cap = std::max(1, p.threads / base.max_cols());  // one element per thread and tile
    int last_teams = -1;
    for (int64_t rows = 1; rows <= std::min<int64_t>(B, 256); ++rows) {
      const int teams = static_cast<int>((B + rows - 1) / rows);
      if (teams == last_teams) continue;
      last_teams = teams;
      if (!only.allows_teams(teams)) continue;
      p.row_groups = teams;
      const int R = static_cast<int>((B + teams - 1) / teams);
      // The fewest tiles; Grid also splits the rows into up to 4 tiles (its exchange
      // overlaps the other tiles' work).
      for (int split = 1; split <= (ex == Exchange::Grid ? 4 : 1) && split <= R; ++split) {
        p.rows_per_tile = std::min((R + split - 1) / split, rt_cap);
        if (split > 1 && p.rows_per_tile == std::min((R + split - 2) / (split - 1), rt_cap)) continue;  // as before
        LayoutV2 L = device_v2_layout(B, N, acc, p);
        while (L.shared_bytes(acc) > d.smem_per_block && p.rows_per_tile > 1) L.rows_per_tile = --p.rows_per_tile;
        if (L.shared_bytes(acc) > d.smem_per_block) continue;
        if (ex == Exchange::Grid) {  // co-residency, for the cooperative launch
          const int fit = blocks_per_sm(d, p.threads, L.shared_bytes(acc), d.v2_regs) * d.sms;
          if (!d.cooperative || static_cast<int64_t>(teams) * C > fit) continue;
        }
        if (ex == Exchange::Cluster && active_clusters(d, C) < 1) continue;
        if (ex != Exchange::Cluster && blocks_per_sm(d, p.threads, L.shared_bytes(acc), d.v2_regs) < 1) continue;
        p.shared_bytes = L.shared_bytes(acc);
        const StepCost cost = v2_cost(B, N, acc, p, d, k);
        p.forward_us = cost.forward_us;
        p.backward_us = cost.backward_us;
        if (!best.persistent || p.forward_us + p.backward_us < best.forward_us + best.backward_us) best = p;
      }
    }
  };
  consider(Exchange::Block, 1);
  if (d.clusters)
    for (int C = 2; C <= d.max_cluster; C *= 2) consider(Exchange::Cluster, C);
  for (int C = 2; C <= d.sms; ++C) consider(Exchange::Grid, C);
  if (best.persistent) best.reason.clear();
  return best;
}

constexpr int kMaxRowsPerTile = 64;  // v1: rows of A staged per tile
constexpr int kMinRowsPerTile = 8;   // v1: wanted beside W's slice (fewer: more block barriers per step)

// Kernel v1's layout on a device with `sms` multiprocessors and `budget` bytes of
// shared memory per block (one block per SM at most), or persistent = false and
// the reason. The fewest column groups whose slice of W fits beside a tile of
// rows (each block reads its rows of A from L2 every step: col_groups x B x N in
// all), then as many row groups as the SMs allow (less work per block). The CUDA
// side then checks occupancy (recurrence_cuda.cu).
// Shared memory of a v1 block, at most: its slice of W (N x cols), `rows` staged
// rows of A (N + 1 each) and the partial sums (at most `threads`), `acc` bytes each.
inline int64_t plan_bytes(int64_t N, int64_t cols, int64_t rows, int threads, int64_t acc) {
  return (N * cols + threads + rows * (N + 1 + cols)) * acc;
}

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
    p.version = 1;
    p.col_groups = static_cast<int>(c);
    p.row_groups = static_cast<int>(r);
    p.rows_per_tile = static_cast<int>(std::min<int64_t>({rows_per_block, kMaxRowsPerTile, fit}));
    p.shared_bytes = make_layout(1, B, N, p.col_groups, p.row_groups, threads, p.rows_per_tile).shared_elems() * acc;
    const StepCost cost = v1_cost(B, N, p);
    p.forward_us = cost.forward_us;
    p.backward_us = cost.backward_us;
    return p;
  }
  const int64_t cols = (N + sms - 1) / sms;
  p.reason = "W does not fit on chip: with " + std::to_string(sms) + " blocks a block's slice of W (" +
             std::to_string(N) + " x " + std::to_string(cols) + ") and a tile of rows need " +
             std::to_string(bytes_for(cols, 1)) + " bytes of shared memory or more, the device allows " +
             std::to_string(budget);
  return p;
}

// Kernel v1's layout forced by NNRNN_CUDA_PLAN="<col_groups>x<row_groups>"
// (benchmarks/gpu_check.sh times the grid barrier at chosen grid sizes this way; the
// plan is then v1's); rows per tile as many as fit, up to the block's rows and
// kMaxRowsPerTile. A spec that is malformed or does not fit is an error.
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
  p.version = 1;
  p.threads = threads;
  p.col_groups = c;
  p.row_groups = r;
  p.rows_per_tile = static_cast<int>(std::min<int64_t>({std::max<int64_t>(1, (B + r - 1) / r), kMaxRowsPerTile, fit}));
  p.shared_bytes = make_layout(1, B, N, c, r, threads, p.rows_per_tile).shared_elems() * acc;
  const StepCost cost = v1_cost(B, N, p);
  p.forward_us = cost.forward_us;
  p.backward_us = cost.backward_us;
  return p;
}

// NNRNN_CUDA_PLAN, or "" when unset.
inline std::string plan_override() {
  const char* v = std::getenv("NNRNN_CUDA_PLAN");
  return v == nullptr ? std::string() : std::string(v);
}

// Kernel v1's layout: NNRNN_CUDA_PLAN's when it is set, else the planner's.
inline Plan persistent_plan(int64_t N, int64_t B, int64_t acc, int sms, int64_t budget, int threads) {
  const std::string spec = plan_override();
  if (!spec.empty()) return forced_persistent_plan(spec, N, B, acc, budget, threads);
  return choose_persistent_plan(N, B, acc, sms, budget, threads);
}

// Which kernel versions the plan may take: NNRNN_CUDA_KERNEL (auto, v1, v2).
enum class KernelChoice { Auto, V1, V2, TC };

// The choice in effect: NNRNN_CUDA_PLAN forces kernel v1's layout, hence v1.
inline KernelChoice effective_choice(KernelChoice c) { return plan_override().empty() ? c : KernelChoice::V1; }

// The plan for (N, B): with `choice` Auto, the fastest by the model among kernel v2
// (float32 and float64 only; float16/bfloat16 keep v1 until the tensor-core path),
// kernel v1 and the fallback; with V1 or V2, that kernel wherever it fits (for
// measuring the two side by side), else the fallback. v2 and v1 come from the
// callers (v1's co-residency depends on the device); this picks and explains.
inline Plan pick_plan(const Plan& v2, const Plan& v1, int64_t B, int64_t N, KernelChoice choice) {
  auto total = [](const Plan& p) { return p.forward_us + p.backward_us; };
  const Plan* best = nullptr;
  if (choice != KernelChoice::V1 && v2.persistent) best = &v2;
  if (choice != KernelChoice::V2 && v1.persistent && (!best || total(v1) < total(*best))) best = &v1;
  Plan fallback;
  const StepCost cost = fallback_cost(B, N);
  fallback.forward_us = cost.forward_us;
  fallback.backward_us = cost.backward_us;
  if (best && (choice != KernelChoice::Auto || total(*best) <= total(fallback))) return *best;
  if (best) {
    fallback.reason = "the cost model predicts the fallback faster than kernel v" + std::to_string(best->version);
  } else {
    if (choice != KernelChoice::V1) fallback.reason = v2.reason;
    if (choice != KernelChoice::V2) fallback.reason += (fallback.reason.empty() ? "" : "; ") + v1.reason;
  }
  return fallback;
}

// What cuda_path says of a plan: the kernel
// version and exchange, the layout, the shared memory per block and the model's
// prediction, e.g. "persistent v2 cluster: 16 teams x 8 blocks of 512 threads, 2 rows
// per tile, 16512 bytes of shared memory per block; predicted 0.98 us/step forward,
// 1.42 us/step backward", "persistent v1: 5 x 26 blocks (column x row groups) of 512
// threads, ...", or "fallback: <reason>; predicted ...".
inline std::string describe(const Plan& p) {
  auto us = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.2f", v);
    return std::string(buf);
  };
  const std::string predicted =
      "predicted " + us(p.forward_us) + " us/step forward, " + us(p.backward_us) + " us/step backward";
  if (!p.persistent) return "fallback: " + p.reason + "; " + predicted;
  if (p.version == 2 || p.version == 3) {
    const std::string forced_teams = team_override().spec;
    const char* ex = p.exchange == Exchange::Block ? "block" : p.exchange == Exchange::Cluster ? "cluster" : "grid";
    const std::string kernel = p.version == 2 ? "v2 " : "tensor cores (KT " + std::to_string(p.kt) + ") ";
    return "persistent " + kernel + ex + ": " + std::to_string(p.row_groups) + " teams x " +
           std::to_string(p.col_groups) + " blocks of " + std::to_string(p.threads) + " threads, " +
           std::to_string(p.rows_per_tile) + " rows per tile, " + std::to_string(p.shared_bytes) +
           " bytes of shared memory per block" +
           (forced_teams.empty() ? "" : "; layout set by NNRNN_CUDA_TEAMS=" + forced_teams) + "; " + predicted;
  }
  const std::string forced = plan_override();
  return "persistent v1: " + std::to_string(p.col_groups) + " x " + std::to_string(p.row_groups) +
         " blocks (column x row groups) of " + std::to_string(p.threads) + " threads, " +
         std::to_string(p.rows_per_tile) + " rows per tile, " + std::to_string(p.shared_bytes) +
         " bytes of shared memory per block" + (forced.empty() ? "" : "; layout set by NNRNN_CUDA_PLAN=" + forced) +
         "; " + predicted;
}

// "auto", "v1", "v2" or "tc" (NNRNN_CUDA_KERNEL; empty: auto).
inline KernelChoice parse_kernel_choice(const std::string& v, const char* what) {
  if (v.empty() || v == "auto") return KernelChoice::Auto;
  if (v == "v1") return KernelChoice::V1;
  if (v == "v2") return KernelChoice::V2;
  if (v == "tc") return KernelChoice::TC;
  TORCH_CHECK_VALUE(false, what, " must be 'auto', 'v1', 'v2' or 'tc', got '", v, "'");
}

// Kernel v2's plan for a dtype: float32 and float64; float16/bfloat16 keep v1
// (their recurrence runs in float32 there; the tensor-core path is to come).
inline Plan v2_plan_for(int64_t N, int64_t B, c10::ScalarType dtype, const DeviceModel& d) {
  if (dtype != c10::kFloat && dtype != c10::kDouble) {
    Plan p;
    p.reason = "kernel v2 runs float32 and float64 only";
    return p;
  }
  return choose_v2_plan(N, B, dtype == c10::kDouble ? 8 : 4, d, team_override());
}

}  // namespace nnrnn::kern
