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

#include <cmath>

#if defined(__CUDACC__)
#define NNRNN_HD __host__ __device__ __forceinline__
#else
#define NNRNN_HD inline
#endif

namespace nnrnn {

enum class Nonlinearity : int { ModReLU = 0, Tanh = 1, ReLU = 2 };

template <typename T>
NNRNN_HD T activate(Nonlinearity f, T z, T b) {
  switch (f) {
    case Nonlinearity::ModReLU: {
      const T r = (z < T(0) ? -z : z) + b;
      if (r > T(0) && z != T(0)) return z > T(0) ? r : -r;
      return z == z ? T(0) : z;  // keeps NaN
    }
    case Nonlinearity::Tanh:
#if defined(__CUDA_ARCH__)
      return tanh(z + b);
#else
      return std::tanh(z + b);
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
