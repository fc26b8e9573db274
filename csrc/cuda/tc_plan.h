// The tensor-core path's layout and cost model (docs/tensor_cores.md):
// which team layout, and how long a step takes by the model. Host code only, beside
// kernel v2's plan (plan.h), whose device model and constants it uses.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include <ATen/Context.h>
#include <c10/core/ScalarType.h>

#include "plan.h"
#include "tc_kernels.h"

namespace nnrnn::kern {

// Instructions along k per warp on the GPU (the kernel's KT); the host emulation
// also runs 1 and 2, to cover many k-chunks with small N.
constexpr int kTcKtSmall = 8, kTcKtLarge = 16;

// Estimates for an H100 SXM, each to be checked by the first GPU run.
struct TcConstants {
  double mma_fma_per_clock = 1024;  // mma.sync per SM, float16/bfloat16 (TF32: half); wgmma would double it
  double mma_latency = 33;          // clocks from an HMMA to its dependent HMMA
  double lds_latency = 30;          // a shared-memory load (the B fragment) to its use
  double finish_clocks = 200;       // one pair of elements (the first pair's inputs prefetched): sums, nonlinearity, stores
  double gemm_fma_per_us = 300e6;   // cuBLAS on tensor cores, large (600 TFLOP/s float16/bfloat16; TF32 half)
};

inline TcLayout tc_layout(int64_t T, int64_t B, int64_t N, Exchange ex, int C, int G, int rows_per_tile, int kt,
                          MmaKind kind) {
  TcLayout L{T, B, N, ex, C, G, rows_per_tile, kt, kind, {}};
  L.derive();
  return L;
}

// Blocks of the layout that fit on one SM (the kernel may use all 128 registers per thread).
inline int tc_blocks_per_sm(const TcLayout& L, const DeviceModel& d) {
  return blocks_per_sm(d, L.threads(), L.shared_bytes(), 128);
}

// The model's forward and backward per step for a tensor-core layout.
inline StepCost tc_cost(const TcLayout& L, const DeviceModel& d, const CostConstants& k = CostConstants(),
                        const TcConstants& tc = TcConstants()) {
  const double clock_mhz = k.clock_ghz * 1e3;
  const int R = L.max_rows(), RT = L.rows_per_tile, tiles = (R + RT - 1) / RT;
  const int n_tiles = (R + kTcMmaN - 1) / kTcMmaN;
  const double rate = L.kind == MmaKind::TF32 ? tc.mma_fma_per_clock / 2 : tc.mma_fma_per_clock;
  const double mmas = static_cast<double>(L.warps()) * n_tiles * L.kt;  // per block and step
  // Each MMA: 16 x 8 x K FMAs; two 4-byte shared loads per lane for its B fragment
  // (two wavefronts); the issue slots of the four schedulers.
  const double throughput =
      std::max({mmas * kTcMmaM * kTcMmaN * L.k_inst() / rate, mmas * 2, mmas * 4 / 4.0}) / k.issue_efficiency;
  // One warp's dependent chain: per n-tile, half the k-instructions (two accumulators) and a load.
  const double chain = n_tiles * (std::ceil(L.kt / 2.0) * tc.mma_latency + tc.lds_latency);
  const int pairs = (L.max_cols() + 1) / 2;
  const double finish =
      tiles * (std::ceil(static_cast<double>(std::min(RT, R)) * pairs / L.threads()) * (L.k_chunks() * 4.0 + tc.finish_clocks));
  double exchange = 0, copy = 0, publish = 0;
  if (L.exchange == Exchange::Cluster) {
    exchange = k.cluster_exchange_us;
    publish = static_cast<double>(R) * L.max_cols() * L.team_blocks * L.operand_bytes() / k.dsmem_bytes_per_clock;
  } else if (L.exchange == Exchange::Grid) {
    exchange = k.grid_exchange_us;
    copy = static_cast<double>(L.grid()) * R * L.N * L.operand_bytes() / k.l2_bytes_per_us;  // rows of A from L2
  }
  // Blocks sharing one SM (more teams than SMs) share its throughput.
  const int resident = std::max(1, tc_blocks_per_sm(L, d));
  const int per_sm = static_cast<int>(std::min<int64_t>(resident, (L.grid() + d.sms - 1) / d.sms));
  int64_t capacity = static_cast<int64_t>(resident) * d.sms;
  if (L.exchange == Exchange::Cluster) capacity = static_cast<int64_t>(active_clusters(d, L.team_blocks)) * L.team_blocks;
  const double waves = std::ceil(static_cast<double>(L.grid()) / std::max<int64_t>(capacity, 1));
  const double product = std::max(std::max(throughput * per_sm, chain) / clock_mhz, copy);
  // Block barriers as kernel v2's; the finishes are counted whole (a tile's finish may
  // overlap the next tile's product, which this model does not credit).
  const double work = product + (finish + publish) / clock_mhz + team_barriers(L.exchange, tiles) * k.block_barrier_us;
  const double step = team_step_us(L.exchange, exchange, work, RT, R);
  const double gemm = L.kind == MmaKind::TF32 ? tc.gemm_fma_per_us / 2 : tc.gemm_fma_per_us;
  const double dw = static_cast<double>(L.B) * L.N * L.N / gemm;  // dW after the loop, per step
  // The backward's finish reads two more inputs and writes three outputs: 10% more (as kernel v2's model).
  return {step * waves, 1.1 * step * waves + dw};
}

// The fastest tensor-core plan by the model for (N, B) and operand kind (version 3:
// exchange, col_groups = blocks of a team, row_groups = teams, threads,
// rows_per_tile, kt), or persistent = false and why none fits.
inline Plan choose_tc_plan(int64_t N, int64_t B, MmaKind kind, const DeviceModel& d,
                           const TeamOverride& only = TeamOverride(), const CostConstants& k = CostConstants()) {
  Plan best;
  best.reason = only.spec.empty()
                    ? "tensor-core path: W does not fit in the registers of a team (" + std::to_string(N) + " x " +
                          std::to_string(N) + ", at most " + std::to_string(kTcMaxThreads) + " threads per block)"
                    : only.refusal("tensor-core path");
  auto consider = [&](Exchange ex, int C) {
    if (2 * C > N + 1 || !only.allows(ex, C)) return;  // every block owns columns (slices start at even columns)
    for (int kt : {kTcKtSmall, kTcKtLarge}) {
      if (tc_layout(1, B, N, ex, C, 1, kTcMmaN, kt, kind).threads() > kTcMaxThreads) continue;  // W not in registers
      int last_teams = -1;
      // Teams of 1 to 7 rows (one n-tile, padded: the MMAs of 8 rows, less to publish), then of whole n-tiles.
      for (int64_t rows = 1; rows < B + kTcMmaN; rows += rows < kTcMmaN ? 1 : kTcMmaN) {
        const int teams = static_cast<int>((B + rows - 1) / rows);
        if (teams == last_teams) continue;
        last_teams = teams;
        if (!only.allows_teams(teams)) continue;
        const int a_rows = tc_layout(1, B, N, ex, C, teams, kTcMmaN, kt, kind).a_rows();
        // The largest tile that fits; Grid also smaller ones, down to a quarter of the rows
        // (its exchange overlaps the other tiles' work).
        const int largest = std::min(a_rows, 64), smallest = ex == Exchange::Grid ? std::max(kTcMmaN, a_rows / 4) : largest;
        for (int rt = largest; rt >= smallest; rt -= kTcMmaN) {
          TcLayout L = tc_layout(1, B, N, ex, C, teams, rt, kt, kind);
          while (L.shared_bytes() > d.smem_per_block && L.rows_per_tile > kTcMmaN)
            L = tc_layout(1, B, N, ex, C, teams, L.rows_per_tile - kTcMmaN, kt, kind);
          if (L.shared_bytes() > d.smem_per_block || tc_blocks_per_sm(L, d) < 1) continue;
          if (ex == Exchange::Grid && (!d.cooperative || L.grid() > tc_blocks_per_sm(L, d) * d.sms)) continue;
          if (ex == Exchange::Cluster && active_clusters(d, C) < 1) continue;
          const StepCost cost = tc_cost(L, d, k);
          if (best.persistent && cost.forward_us + cost.backward_us >= best.forward_us + best.backward_us) continue;
          best.persistent = true;
          best.version = 3;
          best.exchange = ex;
          best.col_groups = C;
          best.row_groups = teams;
          best.threads = L.threads();
          best.rows_per_tile = L.rows_per_tile;
          best.shared_bytes = L.shared_bytes();
          best.kt = kt;
          best.forward_us = cost.forward_us;
          best.backward_us = cost.backward_us;
          best.reason.clear();
        }
      }
    }
  };
  consider(Exchange::Block, 1);
  if (d.clusters)
    for (int C = 2; C <= d.max_cluster; C *= 2) consider(Exchange::Cluster, C);
  for (int C = 2; C <= d.sms; ++C) consider(Exchange::Grid, C);
  return best;
}

// PyTorch's own switch for TF32 in float32 CUDA matmuls (torch.backends.cuda.matmul.allow_tf32,
// also set by torch.set_float32_matmul_precision("high")), read when a plan is made: the
// CUDA side and model_plan read the same flag.
inline bool tf32_allowed_by_torch() { return at::globalContext().allowTF32CuBLAS(); }

// The operands of the tensor-core path for a dtype: float16, bfloat16, and float32
// as TF32 only where the user allows TF32 (tf32_allowed_by_torch()).
inline Plan tc_plan_for(int64_t N, int64_t B, c10::ScalarType dtype, bool allow_tf32, const DeviceModel& d) {
  Plan p;
  const TeamOverride only = team_override();
  if (dtype == c10::kHalf) return choose_tc_plan(N, B, MmaKind::F16, d, only);
  if (dtype == c10::kBFloat16) return choose_tc_plan(N, B, MmaKind::BF16, d, only);
  if (dtype == c10::kFloat && allow_tf32) return choose_tc_plan(N, B, MmaKind::TF32, d, only);
  p.reason = dtype == c10::kFloat ? "the tensor-core path takes float32 only as TF32, which "
                                    "torch.backends.cuda.matmul.allow_tf32 does not allow"
                                  : "the tensor-core path runs float16, bfloat16 and (TF32) float32";
  return p;
}

// pick_plan (plan.h) with the tensor-core plan as a further candidate: with
// `choice` Auto the fastest by the model; TC: the tensor-core path wherever it fits,
// else the fallback.
inline Plan pick_plan_with_tc(const Plan& tc, const Plan& v2, const Plan& v1, int64_t B, int64_t N,
                              KernelChoice choice) {
  if (choice == KernelChoice::TC) {
    if (tc.persistent) return tc;
    Plan fallback;
    const StepCost cost = fallback_cost(B, N);
    fallback.forward_us = cost.forward_us;
    fallback.backward_us = cost.backward_us;
    fallback.reason = tc.reason;
    return fallback;
  }
  const Plan other = pick_plan(v2, v1, B, N, choice);
  auto total = [](const Plan& p) { return p.forward_us + p.backward_us; };
  if (choice == KernelChoice::Auto && tc.persistent && total(tc) < total(other)) return tc;
  return other;
}

}  // namespace nnrnn::kern
