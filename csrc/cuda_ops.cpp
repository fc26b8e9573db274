// Extra ops around the CUDA kernels, defined in every build (with or without CUDA):
//
//   cuda_path(N, B, dtype, device) -> str
//       which path recurrence takes on that device: "persistent <kernel version>:
//       <plan>", or "fallback: <reason>", or "unavailable: <reason>"; no tensor
//       arguments, so one implementation serves every backend.
//   emulated_recurrence(..., col_groups, row_groups, threads, rows_per_tile, persistent)
//   emulated_recurrence_backward(..., col_groups, row_groups, threads, rows_per_tile, persistent)
//       the CUDA kernels' source run on CPU tensors by a host emulation of the
//       grid (cpu/emulated_cuda.cpp), with the given launch shape: a test of the
//       kernels' logic on machines without a GPU.
//   emulated_recurrence_v2(..., exchange, team_blocks, teams, rows_per_tile)
//   emulated_recurrence_v2_backward(..., exchange, team_blocks, teams, rows_per_tile)
//       the same for kernel v2 (exchange: "block", "cluster" or "grid").
//   emulated_recurrence_tc(..., exchange, team_blocks, teams, rows_per_tile, kt)
//   emulated_recurrence_tc_backward(..., exchange, team_blocks, teams, rows_per_tile, kt)
//       the same for the tensor-core path (float16, bfloat16 CPU tensors; float32
//       as TF32), its mma.sync emulated per lane; kt 1 or 2.
//   emulated_plan(N, B, dtype, sms, smem_bytes, threads) -> int[]
//       kernel v1's layout that the CUDA side would choose on a device with
//       that many SMs and that much shared memory per block, before its occupancy
//       check: [col_groups, row_groups, rows_per_tile, shared_bytes], or [] when W
//       does not fit (the fallback). Honours NNRNN_CUDA_PLAN as the CUDA side does.
//   model_plan(N, B, dtype, kernel="auto", sms=132, smem_bytes=232448, active_clusters=-1, allow_tf32=None)
//       -> (str, float[])
//       the plan that the cost model (cuda/plan.h, tc_plan.h) picks on an H100 SXM (the
//       DeviceModel defaults; sms, smem_bytes and the clusters of every size that can
//       be resident at once, as cudaOccupancyMaxActiveClusters would say, may be
//       changed; -1: unknown, the model's estimate) for kernel choice "auto", "v1",
//       "v2" or "tc", as cuda_path describes it, and [version (0: fallback, 3: tensor
//       cores), exchange (0 block, 1 cluster, 2 grid), col_groups, row_groups, threads,
//       rows_per_tile, forward_us, backward_us, kt]. allow_tf32: float32 may take the
//       tensor-core path as TF32; None: as the CUDA side decides, by PyTorch's switch
//       (torch.backends.cuda.matmul.allow_tf32).
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda/driver.h"
#include "cuda/path.h"

namespace nnrnn {
namespace {

std::string cuda_path(int64_t N, int64_t B, c10::ScalarType dtype, c10::Device device) {
  TORCH_CHECK_VALUE(N >= 0 && B >= 0, "cuda_path: N and B must be >= 0, got N = ", N, ", B = ", B);
  TORCH_CHECK_VALUE(device.is_cuda(), "cuda_path: device must be a CUDA device, got ", device);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
                    "cuda_path: unsupported dtype ", dtype, "; supported: float32, float64, float16, bfloat16");
#if defined(NNRNN_WITH_CUDA)
  return cuda::describe_path(N, B, dtype, device.has_index() ? device.index() : -1);
#else
  return "unavailable: the extension was built without its CUDA kernels";
#endif
}

std::vector<int64_t> emulated_plan(int64_t N, int64_t B, c10::ScalarType dtype, int64_t sms, int64_t smem_bytes,
                                   int64_t threads) {
  TORCH_CHECK_VALUE(N >= 1 && B >= 1 && sms >= 1 && smem_bytes >= 1 && threads >= 1,
                    "emulated_plan: N, B, sms, smem_bytes and threads must be >= 1");
  const int64_t acc = dtype == at::kDouble ? 8 : 4;
  const kern::Plan p = kern::persistent_plan(N, B, acc, static_cast<int>(sms), smem_bytes, static_cast<int>(threads));
  if (!p.persistent) return {};
  const auto L = kern::make_layout(1, B, N, p.col_groups, p.row_groups, p.threads, p.rows_per_tile);
  return {p.col_groups, p.row_groups, p.rows_per_tile, kern::shared_bytes(L, acc)};
}

std::tuple<std::string, std::vector<double>> model_plan(int64_t N, int64_t B, c10::ScalarType dtype,
                                                       c10::string_view kernel, int64_t sms, int64_t smem_bytes,
                                                       int64_t active_clusters, std::optional<bool> allow_tf32) {
  TORCH_CHECK_VALUE(N >= 1 && B >= 1 && sms >= 1 && smem_bytes >= 1,
                    "model_plan: N, B, sms and smem_bytes must be >= 1");
  TORCH_CHECK_VALUE(active_clusters >= -1, "model_plan: active_clusters must be >= 0, or -1 (unknown), got ",
                    active_clusters);
  const kern::KernelChoice choice =
      kern::effective_choice(kern::parse_kernel_choice(std::string(kernel), "model_plan: kernel"));
  const int64_t acc = dtype == at::kDouble ? 8 : 4;
  kern::DeviceModel h100;  // an H100 SXM, with `sms` SMs and `smem_bytes` of shared memory per block and SM
  h100.sms = static_cast<int>(sms);
  h100.smem_per_block = smem_bytes;
  h100.smem_per_sm = std::max<int64_t>(smem_bytes, h100.smem_per_sm);
  h100.active_clusters = kern::filled(static_cast<int>(active_clusters));
  const kern::Plan v2 = kern::v2_plan_for(N, B, dtype, h100);
  const kern::Plan v1 = kern::persistent_plan(N, B, acc, h100.sms, h100.smem_per_block, 512);
  const kern::Plan tc = kern::tc_plan_for(N, B, dtype, allow_tf32.value_or(kern::tf32_allowed_by_torch()), h100);
  const kern::Plan p = kern::pick_plan_with_tc(tc, v2, v1, B, N, choice);
  return {kern::describe(p),
          {static_cast<double>(p.persistent ? p.version : 0), static_cast<double>(p.exchange),
           static_cast<double>(p.col_groups), static_cast<double>(p.row_groups), static_cast<double>(p.threads),
           static_cast<double>(p.rows_per_tile), p.forward_us, p.backward_us, static_cast<double>(p.kt)}};
}

}  // namespace
}  // namespace nnrnn

TORCH_LIBRARY_FRAGMENT(nnrnn_fused, m) {
  m.def("cuda_path(int N, int B, ScalarType dtype, Device device) -> str", &nnrnn::cuda_path);
  m.def("emulated_plan(int N, int B, ScalarType dtype, int sms, int smem_bytes, int threads) -> int[]",
        &nnrnn::emulated_plan);
  m.def(
      "model_plan(int N, int B, ScalarType dtype, str kernel=\"auto\", int sms=132, int smem_bytes=232448,"
      " int active_clusters=-1, bool? allow_tf32=None) -> (str, float[])",
      &nnrnn::model_plan);
  m.def(
      "emulated_recurrence(Tensor x, Tensor W, Tensor? b, Tensor? h0, Tensor? lengths, str nonlinearity,"
      " int col_groups, int row_groups, int threads, int rows_per_tile, bool persistent)"
      " -> (Tensor output, Tensor h_n)");
  m.def(
      "emulated_recurrence_backward(Tensor grad_output, Tensor grad_h_n, Tensor output, Tensor W,"
      " Tensor? h0, Tensor? lengths, str nonlinearity, int col_groups, int row_groups, int threads,"
      " int rows_per_tile, bool persistent) -> (Tensor grad_x, Tensor grad_W, Tensor grad_b, Tensor grad_h0)");
  m.def(
      "emulated_recurrence_v2(Tensor x, Tensor W, Tensor? b, Tensor? h0, Tensor? lengths, str nonlinearity,"
      " str exchange, int team_blocks, int teams, int rows_per_tile) -> (Tensor output, Tensor h_n)");
  m.def(
      "emulated_recurrence_v2_backward(Tensor grad_output, Tensor grad_h_n, Tensor output, Tensor W,"
      " Tensor? h0, Tensor? lengths, str nonlinearity, str exchange, int team_blocks, int teams,"
      " int rows_per_tile) -> (Tensor grad_x, Tensor grad_W, Tensor grad_b, Tensor grad_h0)");
  m.def(
      "emulated_recurrence_tc(Tensor x, Tensor W, Tensor? b, Tensor? h0, Tensor? lengths, str nonlinearity,"
      " str exchange, int team_blocks, int teams, int rows_per_tile, int kt) -> (Tensor output, Tensor h_n)");
  m.def(
      "emulated_recurrence_tc_backward(Tensor grad_output, Tensor grad_h_n, Tensor output, Tensor W,"
      " Tensor? h0, Tensor? lengths, str nonlinearity, str exchange, int team_blocks, int teams,"
      " int rows_per_tile, int kt) -> (Tensor grad_x, Tensor grad_W, Tensor grad_b, Tensor grad_h0)");
}
