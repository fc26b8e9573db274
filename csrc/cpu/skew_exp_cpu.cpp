// The elementwise core of the backward of P = exp(A) (nnrnn_fused/parametrization.py, _SkewExp):
//
//   inner = F_c * (M + M^T) + F_s * (K + K^T)      (n x n, the dtype of M and K)
//
// with F_c, F_s the divided differences of cos(sqrt l) and sinc(sqrt l) between the rotation angles
// of A (theta, n/2 of them, and a lone 0 first for odd n; entry i of an n x n grid belongs to angle
// (i + n % 2) / 2). In PyTorch this is some forty small operations on (n/2)^2 and n^2 grids, about
// 0.3 ms of per-call cost at n = 128 on the CPU, more than their arithmetic; here it is one pass.
// Same formulas as the Python (_divided_differences), in float64:
//   hi, lo = max, min(a, b), m = (a + b) / 2, d = (hi - lo) / 2
//   F_c = -sinc(m) sinc(d) / 2
//   F_s = (cos m sinc d - sinc lo) / (2 hi m), its Taylor series in a^2, b^2 below hi = 0.05.
// sin m, cos m and sin d come from each angle's sin and cos of half the angle by the addition
// formulas (products of numbers at most 1: absolute error ~1e-16), except that sinc m and sinc d
// below 0.25 are taken directly (there the formulas would cancel, and sinc(0) = 1 needs x / x):
// the relative error of each sinc stays ~1e-15.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace nnrnn {
namespace {

constexpr double kTiny = 1e-300;        // x / max(x, kTiny) stays finite at 0, as in the Python
constexpr double kSeriesBelow = 0.05;   // F_s's Taylor series below this hi
constexpr double kDirectSinBelow = 0.25;

inline double sinc_of(double x) {
  x = std::max(x, kTiny);
  return std::sin(x) / x;
}

// F_c and F_s over the k x k pairs of angles (symmetric), rounded to T as the Python rounds them.
template <typename T>
void divided_differences(const double* theta, int64_t k, T* F_c, T* F_s) {
  std::vector<double> half_sin(k), half_cos(k), sinc(k);
  for (const auto a : c10::irange(k)) {
    half_sin[a] = std::sin(theta[a] * 0.5);
    half_cos[a] = std::cos(theta[a] * 0.5);
    sinc[a] = sinc_of(theta[a]);
  }
  for (const auto a : c10::irange(k)) {
    for (int64_t b = 0; b <= a; ++b) {
      const bool a_high = theta[a] >= theta[b];
      const int64_t h = a_high ? a : b, l = a_high ? b : a;
      const double hi = theta[h], lo = theta[l];
      const double m = (theta[a] + theta[b]) * 0.5, d = (hi - lo) * 0.5;
      const double cos_m = half_cos[a] * half_cos[b] - half_sin[a] * half_sin[b];
      const double sinc_m = m < kDirectSinBelow ? sinc_of(m)
                                                : (half_sin[a] * half_cos[b] + half_cos[a] * half_sin[b]) / m;
      const double sinc_d = d < kDirectSinBelow ? sinc_of(d)
                                                : (half_sin[h] * half_cos[l] - half_cos[h] * half_sin[l]) / d;
      const double fc = sinc_m * sinc_d * -0.5;
      double fs;
      if (hi < kSeriesBelow) {
        const double la = theta[a] * theta[a], lb = theta[b] * theta[b];
        const double s1 = la + lb, s2 = (theta[a] * theta[b]) * (theta[a] * theta[b]);
        fs = s1 * (1.0 / 120 - s1 / 5040) + (s2 / 5040 - 1.0 / 6);
      } else {
        fs = (cos_m * sinc_d - sinc[l]) / (hi * m * 2 + kTiny);
      }
      F_c[a * k + b] = F_c[b * k + a] = static_cast<T>(fc);
      F_s[a * k + b] = F_s[b * k + a] = static_cast<T>(fs);
    }
  }
}

template <typename T>
void inner_one(const double* theta, int64_t k, const T* M, const T* K, T* out, int64_t n) {
  std::vector<T> F_c(k * k), F_s(k * k);
  divided_differences(theta, k, F_c.data(), F_s.data());
  const int64_t odd = n % 2;
  for (const auto i : c10::irange(n)) {
    const T* fc = F_c.data() + (i + odd) / 2 * k;
    const T* fs = F_s.data() + (i + odd) / 2 * k;
    for (const auto j : c10::irange(n)) {
      const int64_t b = (j + odd) / 2;
      out[i * n + j] = fc[b] * (M[i * n + j] + M[j * n + i]) + fs[b] * (K[i * n + j] + K[j * n + i]);
    }
  }
}

at::Tensor skew_exp_inner_cpu(const at::Tensor& theta, const at::Tensor& M, const at::Tensor& K) {
  TORCH_CHECK_VALUE(M.dim() >= 2 && M.size(-1) == M.size(-2), "skew_exp_inner: M must be (..., n, n), got ",
                    M.sizes());
  const int64_t n = M.size(-1), k = n / 2 + n % 2;
  TORCH_CHECK_VALUE(K.sizes() == M.sizes() && K.scalar_type() == M.scalar_type(),
                    "skew_exp_inner: K must be like M, ", M.sizes(), " ", M.scalar_type(), ", got ", K.sizes(), " ",
                    K.scalar_type());
  TORCH_CHECK_VALUE(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble,
                    "skew_exp_inner: M and K must be float32 or float64, got ", M.scalar_type());
  TORCH_CHECK_VALUE(theta.scalar_type() == at::kDouble && theta.dim() == M.dim() - 1 && theta.size(-1) == k &&
                        theta.sizes().slice(0, theta.dim() - 1) == M.sizes().slice(0, M.dim() - 2),
                    "skew_exp_inner: theta must be float64 (..., ", k, ") for M of shape ", M.sizes(), ", got ",
                    theta.scalar_type(), " ", theta.sizes());
  TORCH_CHECK_VALUE(theta.device().is_cpu() && M.device().is_cpu() && K.device().is_cpu(),
                    "skew_exp_inner: CPU tensors only");
  const at::Tensor t = theta.contiguous(), m = M.contiguous(), kk = K.contiguous();
  at::Tensor out = at::empty_like(m);
  const int64_t batch = n == 0 ? 0 : m.numel() / (n * n);
  AT_DISPATCH_FLOATING_TYPES(m.scalar_type(), "skew_exp_inner", [&] {
    for (const auto i : c10::irange(batch)) {
      inner_one<scalar_t>(t.const_data_ptr<double>() + i * k, k, m.const_data_ptr<scalar_t>() + i * n * n,
                          kk.const_data_ptr<scalar_t>() + i * n * n, out.data_ptr<scalar_t>() + i * n * n, n);
    }
  });
  return out;
}

}  // namespace
}  // namespace nnrnn

TORCH_LIBRARY_FRAGMENT(nnrnn_fused, m) {
  m.def("skew_exp_inner(Tensor theta, Tensor M, Tensor K) -> Tensor");
}

TORCH_LIBRARY_IMPL(nnrnn_fused, CPU, m) { m.impl("skew_exp_inner", &nnrnn::skew_exp_inner_cpu); }
