#include "checks.h"

#include <ATen/ATen.h>

namespace nnrnn {

Nonlinearity parse_nonlinearity(std::string_view name) {
  if (name == "modrelu") return Nonlinearity::ModReLU;
  if (name == "tanh") return Nonlinearity::Tanh;
  if (name == "relu") return Nonlinearity::ReLU;
  TORCH_CHECK_VALUE(false, "fused_nnrnn: nonlinearity must be one of 'modrelu', 'tanh', 'relu', got '",
                    std::string(name), "'");
}

namespace {

bool is_supported_dtype(const at::Tensor& t, bool half_on_cpu) {
  const auto dt = t.scalar_type();
  if (dt == at::kFloat || dt == at::kDouble) return true;
  return (t.is_cuda() || half_on_cpu) && (dt == at::kHalf || dt == at::kBFloat16);
}

void check_like(const char* name, const at::Tensor& t, const at::Tensor& ref,
                at::IntArrayRef shape, const char* shape_text) {
  TORCH_CHECK_VALUE(t.sizes() == shape, "fused_nnrnn: ", name, " must have shape ", shape_text, " = ",
                    shape, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), "fused_nnrnn: ", name, " has dtype ",
                    t.scalar_type(), " but x has dtype ", ref.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "fused_nnrnn: ", name, " is on ", t.device(),
                    " but x is on ", ref.device());
}

void check_lengths(const at::Tensor& lengths, const at::Tensor& x, int64_t B) {
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == B,
                    "fused_nnrnn: lengths must have shape (B,) = (", B, ",), got ", lengths.sizes());
  TORCH_CHECK_VALUE(lengths.scalar_type() == at::kLong || lengths.scalar_type() == at::kInt,
                    "fused_nnrnn: lengths must be int64 or int32, got ", lengths.scalar_type());
  TORCH_CHECK_VALUE(lengths.is_cpu() || lengths.device() == x.device(),
                    "fused_nnrnn: lengths must be on the CPU or on x's device (", x.device(),
                    "), got ", lengths.device());
}

}  // namespace

Sizes check_forward_inputs(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& b,
                           const std::optional<at::Tensor>& h0,
                           const std::optional<at::Tensor>& lengths, bool half_on_cpu) {
  TORCH_CHECK_VALUE(x.dim() == 3, "fused_nnrnn: x must have shape (T, B, N), got ", x.dim(),
                    " dimensions ", x.sizes());
  TORCH_CHECK_VALUE(is_supported_dtype(x, half_on_cpu), "fused_nnrnn: x has dtype ", x.scalar_type(), " on ",
                    x.device(), "; supported: float32 and float64",
                    x.is_cuda() ? ", float16, bfloat16" : " (float16/bfloat16 on CUDA only)");
  const int64_t T = x.size(0), B = x.size(1), N = x.size(2);
  check_like("W", W, x, {N, N}, "(N, N)");
  if (b) check_like("b", *b, x, {N}, "(N,)");
  if (h0) check_like("h0", *h0, x, {B, N}, "(B, N)");
  if (lengths) check_lengths(*lengths, x, B);
  return {T, B, N};
}

Sizes check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& grad_h_n,
                            const at::Tensor& output, const at::Tensor& W,
                            const std::optional<at::Tensor>& h0,
                            const std::optional<at::Tensor>& lengths, bool half_on_cpu) {
  const Sizes s = check_forward_inputs(output, W, std::nullopt, h0, lengths, half_on_cpu);
  check_like("grad_output", grad_output, output, {s.T, s.B, s.N}, "(T, B, N)");
  check_like("grad_h_n", grad_h_n, output, {s.B, s.N}, "(B, N)");
  return s;
}

void check_length_values(const at::Tensor& lengths, int64_t T) {
  TORCH_INTERNAL_ASSERT(lengths.is_cpu());
  if (lengths.numel() == 0) return;
  const auto lo = lengths.min().item<int64_t>();
  const auto hi = lengths.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 0 && hi <= T, "fused_nnrnn: lengths must lie in [0, T] = [0, ", T,
                    "], got values in [", lo, ", ", hi, "]");
}

}  // namespace nnrnn
