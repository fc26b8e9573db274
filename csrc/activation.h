// Pointwise math of the recurrence, shared by the CPU and CUDA kernels (and the
// host-thread emulation of the CUDA kernels), so that every backend computes the
// same function and the same derivative.
//
// The backward needs phi'(a_t) and, for modReLU, sign(z_t). Both are recovered
// from the saved output h_t, so no pre-activation is stored:
//   modrelu: h = sign(z) relu(|z| + b)  ->  dh/dz = 1[h != 0], dh/db = sign(h)
//   tanh:    h = tanh(z + b)            ->  dh/dz = dh/db = 1 - h^2
//   relu:    h = relu(z + b)            ->  dh/dz = dh/db = 1[h > 0]
// (modReLU: h != 0 exactly when z != 0 and |z| + b > 0, and then sign(h) = sign(z).)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NNRNN_HD __host__ __device__ __forceinline__
#else
#define NNRNN_HD inline
#endif

namespace nnrnn {

#if !defined(__CUDA_ARCH__)
// tanh for the CPU time loop, written so that the compiler vectorizes it (glibc's
// tanhf is a scalar call, and was most of a step's time at N=128, B=10).
// tanh|x| = 1 - 2 / (e^{2|x|} + 1), with e^y = 2^k e^r, |r| <= ln2 / 2, e^r by its
// degree-7 Taylor polynomial (relative error < 1e-8). Absolute error about 1e-7.
inline float host_tanh(float x) {
  // Beyond 9.01 float32's tanh is 1: clamped at 10, the formula gives exactly 1 (at 9 it gave 1 - 2^-24,
  // tanh(9) rounded, for every larger |x|: the derivative 1 - h^2 was then not 0). NaN becomes 10 here.
  const float a = std::fabs(x) < 10.0f ? std::fabs(x) : 10.0f;
  const float y = 2.0f * a;
  const int32_t ki = static_cast<int32_t>(y * 1.44269504f + 0.5f);  // y >= 0: truncation rounds
  const float k = static_cast<float>(ki);
  const float r = (y - k * 0.693145752f) - k * 1.42860677e-06f;  // ln 2 split in two
  float p = 1.0f / 5040;
  p = p * r + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t two_k_bits = (ki + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &two_k_bits, sizeof(two_k));
  const float t = 1.0f - 2.0f / (p * two_k + 1.0f);
  // NaN in, NaN out. Written as "+ (NaN or -0)" rather than "x == x ? t : x", and 2^k
  // by memcpy rather than a union: with either of those, GCC 12 keeps the loop scalar
  // inside the packed kernels' target("avx512f") functions.
  return std::copysign(t, x) + (x == x ? -0.0f : x);
}
inline double host_tanh(double x) { return std::tanh(x); }
#endif

enum class Nonlinearity : int { ModReLU = 0, Tanh = 1, ReLU = 2 };

template <typename T>
NNRNN_HD T activate(Nonlinearity f, T z, T b) {
  switch (f) {
    case Nonlinearity::ModReLU: {
      // sign(z) relu(|z| + b) literally, so that NaN and inf in z or b give what the formula
      // gives (sign(0) * inf = NaN); selects only, so that the CPU loop vectorizes.
      const T r = (z < T(0) ? -z : z) + b;
      const T relu_r = r > T(0) ? r : (r == r ? T(0) : r);  // keeps NaN
      const T sign_z = z > T(0) ? T(1) : (z < T(0) ? T(-1) : T(0));
      return sign_z * relu_r;
    }
    case Nonlinearity::Tanh:
#if defined(__CUDA_ARCH__)
      return tanh(z + b);
#else
      return host_tanh(z + b);
#endif
    default: {
      const T a = z + b;
      return a > T(0) ? a : (a == a ? T(0) : a);  // keeps NaN
    }
  }
}

// dh/dz expressed through the output h.
template <typename T>
NNRNN_HD T derivative_from_output(Nonlinearity f, T h) {
  switch (f) {
    case Nonlinearity::ModReLU:
      return h != T(0) ? T(1) : T(0);
    case Nonlinearity::Tanh:
      return T(1) - h * h;
    default:
      return h > T(0) ? T(1) : T(0);
  }
}

// (dh/db) / (dh/dz): the factor that turns dz into the bias gradient.
template <typename T>
NNRNN_HD T bias_factor_from_output(Nonlinearity f, T h) {
  if (f == Nonlinearity::ModReLU) return h > T(0) ? T(1) : (h < T(0) ? T(-1) : T(0));
  return T(1);
}

}  // namespace nnrnn
