// One warp's tensor-core multiply-accumulate (PTX mma.sync) for the tensor-core
// recurrence (tc_kernels.h): operand types, fragments, where each lane's fragment
// elements sit in the matrices, and the instruction itself, on the device (inline
// PTX) and on the host (an emulation of the instruction's per-lane semantics, so
// that the host-thread emulation of ../cpu/host_grid.h runs the same kernel body).
//
// D (16 x 8, float32) = A (16 x K) * B (K x 8) + C, one instruction per warp:
//   float16, bfloat16: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32
//   TF32 (float32 inputs, when allowed): mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32
// Both run on sm_80 and sm_90. The fragment layouts are NVIDIA's (PTX ISA, "Matrix
// Fragments for mma.m16n8k16 with floating point type" and "... mma.m16n8k8"):
// with g = lane / 4 and t = lane % 4,
//   A, 16-bit: element e (0..7; two per 32-bit register, e even in the low half) is
//              row g + 8 * (e / 2 % 2), column 2t + e % 2 + 8 * (e / 4);
//   A, tf32:   element e (0..3, one per register) is row g + 8 * (e % 2), column t + 4 * (e / 2);
//   B, 16-bit: element e (0..3) is row 2t + e % 2 + 8 * (e / 2), column g;
//   B, tf32:   element e (0..1) is row t + 4e, column g;
//   C and D:   element e (0..3) is row g + 8 * (e / 2), column 2t + e % 2.
//
// Host emulation: every GPU thread is a host thread, so no lane sees another's
// registers. mma() there writes the lane's A and B fragments into a per-warp
// scratch area (Env::warp_scratch(), MmaWarpScratch), waits at the warp barrier
// (Env::sync_warp()), rebuilds A and B from all 32 lanes' fragments with the PTX
// ISA's layouts (namespace ptx below: transcribed apart from the kernel's own
// coordinate functions) and computes its own four elements of D. Two scratch slots used alternately (each lane counts its
// calls) make one barrier per instruction enough: a lane writes slot s again only
// two calls later, after every lane has passed the barrier of the call in between,
// so after every lane has finished reading slot s. All 32 lanes must call mma()
// together, as on the GPU (mma.sync is warp-collective).
// The arithmetic: the products of the rounded operands are exact in float32, and
// are added to C one by one in k order with float32 rounding. NVIDIA does not
// document the tensor cores' internal order and rounding of the sum; the
// difference is of the order of float32 rounding of a K-term sum, far below the
// rounding of the operands to 16 bits that dominates the error (docs/tensor_cores.md).
#pragma once

#include <cstdint>

#include "../activation.h"
#include "kernel_env.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#else
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>
#endif

namespace nnrnn::kern {

enum class MmaKind : int32_t { F16 = 0, BF16 = 1, TF32 = 2 };

// Bits of one operand element in memory: 16-bit types as uint16_t, TF32 as the
// float's 32 bits with the 13 low mantissa bits cleared.
template <MmaKind kind>
struct MmaOperand;

template <>
struct MmaOperand<MmaKind::F16> {
  using bits = uint16_t;
  static constexpr int K = 16;  // the instruction's K
  NNRNN_DEV static bits round(float v) {  // round to nearest even
#if defined(__CUDACC__)
    return __half_as_ushort(__float2half_rn(v));
#else
    return c10::Half(v).x;
#endif
  }
  NNRNN_DEV static float value(bits b) {
#if defined(__CUDACC__)
    return __half2float(__ushort_as_half(b));
#else
    return static_cast<float>(c10::Half(b, c10::Half::from_bits()));
#endif
  }
};

template <>
struct MmaOperand<MmaKind::BF16> {
  using bits = uint16_t;
  static constexpr int K = 16;
  NNRNN_DEV static bits round(float v) {  // round to nearest even
#if defined(__CUDACC__)
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
#else
    return c10::BFloat16(v).x;
#endif
  }
  NNRNN_DEV static float value(bits b) {
#if defined(__CUDACC__)
    return __bfloat162float(__ushort_as_bfloat16(b));
#else
    return static_cast<float>(c10::BFloat16(b, c10::BFloat16::from_bits()));
#endif
  }
};

template <>
struct MmaOperand<MmaKind::TF32> {
  using bits = uint32_t;
  static constexpr int K = 8;
  // cvt.rna.tf32.f32: to the nearest TF32 (10 mantissa bits), ties away from zero.
  NNRNN_DEV static bits round(float v) {
#if defined(__CUDACC__)
    bits r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
    return r;
#else
    uint32_t u;
    std::memcpy(&u, &v, 4);
    if (!std::isfinite(v)) return u;
    return (u + 0x1000u) & 0xFFFFE000u;  // add half of the dropped bits' unit, truncate (on the magnitude)
#endif
  }
  NNRNN_DEV static float value(bits b) {
#if defined(__CUDACC__)
    return __uint_as_float(b);
#else
    float v;
    std::memcpy(&v, &b, 4);
    return v;
#endif
  }
};

// Elements of a fragment per 32-bit register: 2 for the 16-bit types, 1 for TF32.
template <MmaKind kind>
constexpr int kMmaPerRegister = static_cast<int>(4 / sizeof(typename MmaOperand<kind>::bits));

struct MmaA {
  uint32_t r[4];  // 16 x K of A
};
struct MmaB {
  uint32_t r[2];  // K x 8 of B
};
struct MmaC {
  float r[4];  // 16 x 8 of C or D
};

struct MmaCoord {
  int row, col;
};

template <MmaKind kind>
NNRNN_HD MmaCoord mma_a_coord(int lane, int e) {
  const int g = lane >> 2, t = lane & 3;
  if (kind == MmaKind::TF32) return {g + 8 * (e & 1), t + 4 * (e >> 1)};
  return {g + 8 * ((e >> 1) & 1), 2 * t + (e & 1) + 8 * (e >> 2)};
}

template <MmaKind kind>
NNRNN_HD MmaCoord mma_b_coord(int lane, int e) {
  const int g = lane >> 2, t = lane & 3;
  if (kind == MmaKind::TF32) return {t + 4 * e, g};
  return {2 * t + (e & 1) + 8 * (e >> 1), g};
}

NNRNN_HD MmaCoord mma_c_coord(int lane, int e) { return {(lane >> 2) + 8 * (e >> 1), 2 * (lane & 3) + (e & 1)}; }

// This lane's A fragment of the 16 x K tile whose element (m, k) is a(m, k) (a float,
// rounded here). Built once per kernel: the fragments of W stay in registers.
template <MmaKind kind, class F>
NNRNN_DEV MmaA mma_make_a(int lane, const F& a) {
  using Op = MmaOperand<kind>;
  constexpr int per = kMmaPerRegister<kind>;
  MmaA f;
  for (int r = 0; r < 4; ++r) {
    uint32_t word = 0;
    for (int h = 0; h < per; ++h) {
      const MmaCoord c = mma_a_coord<kind>(lane, r * per + h);
      word |= static_cast<uint32_t>(Op::round(a(c.row, c.col))) << (16 * h);
    }
    f.r[r] = word;
  }
  return f;
}

// The 4 bytes at p (aligned to 4).
NNRNN_DEV uint32_t mma_load32(const void* p) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const uint32_t*>(p);
#else
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
#endif
}

// This lane's B fragment of the K x 8 tile with B[k][n] = src[n * stride + k]:
// rows of the recurrence's A (batch rows n, reduction index k) stored along k, in
// shared memory. For the 16-bit types the two elements of a register are adjacent
// in k (one 4-byte load): stride and the tile's first k must be even.
template <MmaKind kind>
NNRNN_DEV MmaB mma_load_b(int lane, const typename MmaOperand<kind>::bits* src, int stride) {
  constexpr int per = kMmaPerRegister<kind>;
  MmaB f;
  for (int r = 0; r < 2; ++r) {
    const MmaCoord c = mma_b_coord<kind>(lane, r * per);
    f.r[r] = mma_load32(src + c.col * stride + c.row);
  }
  return f;
}

#if !defined(__CUDACC__)
// The fragment layouts as the PTX ISA states them ("Matrix Fragments for
// mma.m16n8k16 with floating point type" and "... mma.m16n8k8": row and column of
// element i of lane %laneid), transcribed for the host emulation only: the kernel's
// own coordinates (mma_a_coord etc. above) are a separate encoding, so the emulation
// tests catch a kernel that puts an element where the hardware does not expect it.
namespace ptx {
inline MmaCoord a_m16n8k16(int laneid, int i) {  // .f16 / .bf16, a0..a7
  const int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  const int row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? groupID : groupID + 8;
  const int col = i < 4 ? (threadID_in_group * 2) + (i & 0x1) : (threadID_in_group * 2) + (i & 0x1) + 8;
  return {row, col};
}
inline MmaCoord b_m16n8k16(int laneid, int i) {  // .f16 / .bf16, b0..b3
  const int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  const int row = i < 2 ? (threadID_in_group * 2) + (i & 0x1) : (threadID_in_group * 2) + (i & 0x1) + 8;
  return {row, groupID};
}
inline MmaCoord a_m16n8k8_tf32(int laneid, int i) {  // .tf32, a0..a3
  const int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  const int row = (i == 0 || i == 2) ? groupID : groupID + 8;
  const int col = (i == 0 || i == 1) ? threadID_in_group : threadID_in_group + 4;
  return {row, col};
}
inline MmaCoord b_m16n8k8_tf32(int laneid, int i) {  // .tf32, b0..b1
  const int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  return {i == 0 ? threadID_in_group : threadID_in_group + 4, groupID};
}
inline MmaCoord c_f32(int laneid, int i) {  // .f32 accumulators c0..c3 (both shapes)
  const int groupID = laneid >> 2, threadID_in_group = laneid % 4;
  return {i < 2 ? groupID : groupID + 8, (threadID_in_group * 2) + (i & 0x1)};
}
}  // namespace ptx

// The per-warp exchange area of the host emulation (see the top of this file).
struct MmaWarpScratch {
  uint32_t calls[32];
  struct Lane {
    MmaA a;
    MmaB b;
  } slot[2][32];
};

template <MmaKind kind>
inline float mma_element(uint32_t word, int h) {
  using Op = MmaOperand<kind>;
  return Op::value(static_cast<typename Op::bits>(kMmaPerRegister<kind> == 1 ? word : word >> (16 * h)));
}
#endif

// d = a * b + d for the warp; every lane of the warp calls it with its fragments.
template <MmaKind kind, class Env>
NNRNN_DEV void mma(const Env& env, MmaC& d, const MmaA& a, const MmaB& b) {
#if defined(__CUDACC__)
  (void)env;
  if constexpr (kind == MmaKind::TF32) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  } else if constexpr (kind == MmaKind::BF16) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(d.r[0]), "+f"(d.r[1]), "+f"(d.r[2]), "+f"(d.r[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
#else
  constexpr int K = MmaOperand<kind>::K, per = kMmaPerRegister<kind>;
  auto* scratch = static_cast<MmaWarpScratch*>(env.warp_scratch());
  const int lane = env.thread() % 32;
  MmaWarpScratch::Lane(&slot)[32] = scratch->slot[scratch->calls[lane]++ & 1];
  slot[lane] = {a, b};
  env.sync_warp();
  float A[16][K], B[K][8];
  constexpr bool tf32 = kind == MmaKind::TF32;
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < 4 * per; ++e) {
      const MmaCoord c = tf32 ? ptx::a_m16n8k8_tf32(l, e) : ptx::a_m16n8k16(l, e);
      A[c.row][c.col] = mma_element<kind>(slot[l].a.r[e / per], e % per);
    }
    for (int e = 0; e < 2 * per; ++e) {
      const MmaCoord c = tf32 ? ptx::b_m16n8k8_tf32(l, e) : ptx::b_m16n8k16(l, e);
      B[c.row][c.col] = mma_element<kind>(slot[l].b.r[e / per], e % per);
    }
  }
  for (int e = 0; e < 4; ++e) {
    const MmaCoord c = ptx::c_f32(lane, e);
    float sum = d.r[e];
    for (int k = 0; k < K; ++k) sum += A[c.row][k] * B[k][c.col];  // exact products, float32 sums
    d.r[e] = sum;
  }
#endif
}

}  // namespace nnrnn::kern
