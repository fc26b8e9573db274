// CUDA kernels of nnrnn_fused::recurrence and recurrence_backward, and
// nnrnn_fused::cuda_path. The kernel bodies are in kernels.h and the host logic
// in driver.h (both also run by the CPU emulation); this file adds the CUDA
// launches, the choice of path, and the registration. Design: docs/cuda.md.
//
// Launches go to the current stream; nothing here creates streams or events or
// waits on the host, so a call can be captured in a CUDA graph (lengths then
// have to be on the device: see CudaLauncher::lengths).
// ATen/cuda/CUDAContext.h is not included: it needs the cuBLAS/cuSPARSE headers,
// which some toolkits (pip-installed torch beside a bare nvcc) do not have.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>

#include "driver.h"
#include "path.h"

namespace nnrnn::kern {
namespace {

constexpr const char* kKernelVersion = "v1";  // named by cuda_path, so that runs can be compared
constexpr int kThreads = 512;  // per block of the persistent kernels
constexpr int kPointwiseThreads = 256;

template <class Body>
__global__ void __launch_bounds__(kThreads) persistent_kernel(Body body, unsigned long long watchdog) {
  DeviceEnv env(body.barrier, watchdog);
  body(env);
}

template <class Body>
__global__ void pointwise_kernel(Body body) {
  DeviceEnv env(nullptr, 0);
  body(env);
}

template <typename scalar_t>
using Forward = PersistentForward<scalar_t, at::opmath_type<scalar_t>>;
template <typename scalar_t>
using Backward = PersistentBackward<scalar_t, at::opmath_type<scalar_t>>;

bool fallback_forced() {
  const char* v = std::getenv("NNRNN_CUDA_FORCE_FALLBACK");
  return v != nullptr && *v != '\0' && std::string(v) != "0";
}

// NNRNN_CUDA_WATCHDOG_MS: the grid barrier's deadlock watchdog (kernel_env.h), in
// milliseconds; unset or 0: off. Read at every launch, so tests can set it.
unsigned long long watchdog_ns() {
  const char* v = std::getenv("NNRNN_CUDA_WATCHDOG_MS");
  if (v == nullptr || *v == '\0') return 0;
  char* end = nullptr;
  const double ms = std::strtod(v, &end);
  TORCH_CHECK_VALUE(*end == '\0' && ms >= 0 && ms < 1e9,
                    "NNRNN_CUDA_WATCHDOG_MS must be a number of milliseconds >= 0 (0: off), got '", v, "'");
  return ms > 0 ? std::max(1ull, static_cast<unsigned long long>(ms * 1e6)) : 0;
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, device));
  return value;
}

// The persistent plan for (N, B, dtype) on `device`, or the reason for the fallback.
Plan compute_plan(int64_t N, int64_t B, at::ScalarType dtype, int device) {
  if (!device_attribute(cudaDevAttrCooperativeLaunch, device)) {
    Plan p;
    p.reason = "the device does not support cooperative launches";
    return p;
  }
  const int64_t acc = dtype == at::kDouble ? 8 : 4;
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  const int64_t budget = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  Plan p = persistent_plan(N, B, acc, sms, budget, kThreads);
  if (!p.persistent) return p;
  const int grid = p.col_groups * p.row_groups;
  const int64_t bytes =
      shared_bytes(make_layout(1, B, N, p.col_groups, p.row_groups, kThreads, p.rows_per_tile), acc);

  // Every block of the grid must be resident at once (the grid barrier would
  // otherwise wait forever; the cooperative launch would refuse it).
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  int per_sm = 1 << 30;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nnrnn_cuda_plan", [&] {
    for (const void* kernel : {reinterpret_cast<const void*>(&persistent_kernel<Forward<scalar_t>>),
                               reinterpret_cast<const void*>(&persistent_kernel<Backward<scalar_t>>)}) {
      // Allow the device's maximum once; a launch passes its own size.
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(budget)));
      int n = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, bytes));
      per_sm = std::min(per_sm, n);
    }
  });
  if (static_cast<int64_t>(per_sm) * sms < grid) {
    p.persistent = false;
    p.reason = "only " + std::to_string(per_sm) + " block(s) per SM x " + std::to_string(sms) +
               " SMs can be co-resident with " + std::to_string(bytes) + " bytes of shared memory, the grid needs " +
               std::to_string(grid);
  }
  return p;
}

struct PlanCache {
  using Key = std::tuple<int, int64_t, int64_t, int, std::string>;  // device, N, B, dtype, NNRNN_CUDA_PLAN
  std::mutex mutex;
  std::map<Key, Plan> plans;
};

PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

std::string plan_override() {
  const char* v = std::getenv("NNRNN_CUDA_PLAN");
  return v == nullptr ? std::string() : std::string(v);
}

Plan cuda_plan(int64_t N, int64_t B, at::ScalarType dtype, int device) {
  if (fallback_forced()) {
    Plan p;
    p.reason = "forced by NNRNN_CUDA_FORCE_FALLBACK";
    return p;
  }
  // Cached: the occupancy queries cost microseconds.
  PlanCache& c = plan_cache();
  const PlanCache::Key key{device, N, B, static_cast<int>(dtype), plan_override()};
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.plans.find(key);
  if (it == c.plans.end()) it = c.plans.emplace(key, compute_plan(N, B, dtype, device)).first;
  return it->second;
}

// After the device refused a shape's cooperative launch: the fallback from now on.
void record_refusal(int64_t N, int64_t B, at::ScalarType dtype, int device, const std::string& why) {
  Plan p;
  p.reason = "the device refused the cooperative launch (" + why + ")";
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.plans[PlanCache::Key{device, N, B, static_cast<int>(dtype), plan_override()}] = p;
}

struct CudaLauncher {
  c10::DeviceIndex device;
  cudaStream_t stream;
  at::ScalarType dtype;

  Plan plan(int64_t B, int64_t N, at::ScalarType dtype) const { return cuda_plan(N, B, dtype, device); }

  at::Tensor lengths(const at::Tensor& l, int64_t T) const {
    if (l.is_cpu()) {
      // Validated here; copied from pinned memory without a host sync. A capture
      // would bake the copy's source, a temporary, into the graph: refuse it.
      TORCH_CHECK_VALUE(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
                        "fused_nnrnn: lengths on the CPU cannot be used while capturing a CUDA graph; "
                        "pass lengths on x's device");
      check_length_values(l, T);
      return l.to(at::kInt).pin_memory().to(at::Device(at::kCUDA, device), at::kInt, /*non_blocking=*/true);
    }
    // On the device: checked on the device (no host sync, capture-safe); a value
    // outside [0, T] fails a device-side assertion with this message.
    at::_assert_async(at::logical_and(l.ge(0), l.le(T)).all(), "fused_nnrnn: lengths must lie in [0, T]");
    return l.to(at::kInt).contiguous();
  }

  template <class Body>
  std::string persistent(const Body& body, const Layout& L, int threads, size_t bytes) const {
    unsigned long long watchdog = watchdog_ns();
    void* args[] = {const_cast<Body*>(&body), &watchdog};
    const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&persistent_kernel<Body>),
                                                        dim3(L.grid()), dim3(threads), args, bytes, stream);
    // Too many blocks to be co-resident now (MPS, SMs held by others), or no
    // cooperative launch here: the caller takes the fallback. Other errors raise.
    if (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported) {
      (void)cudaGetLastError();  // not a sticky error: clear it for the next launch
      const std::string why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
      record_refusal(L.N, L.B, dtype, device, why);
      return why;
    }
    C10_CUDA_CHECK(err);
    return "";
  }

  template <class Body>
  void pointwise(const Body& body, int64_t elements) const {
    const int64_t blocks = std::min<int64_t>((elements + kPointwiseThreads - 1) / kPointwiseThreads, 65535);
    pointwise_kernel<Body><<<static_cast<unsigned>(blocks), kPointwiseThreads, 0, stream>>>(body);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

CudaLauncher launcher_for(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.is_cuda(), "fused_nnrnn: the CUDA kernel got a tensor on ", x.device());
  return {x.device().index(), c10::cuda::getCurrentCUDAStream(x.device().index()).stream(), x.scalar_type()};
}

std::tuple<at::Tensor, at::Tensor> recurrence_cuda(const at::Tensor& x, const at::Tensor& W,
                                                   const std::optional<at::Tensor>& b,
                                                   const std::optional<at::Tensor>& h0,
                                                   const std::optional<at::Tensor>& lengths,
                                                   c10::string_view nonlinearity) {
  const c10::cuda::CUDAGuard guard(x.device());
  auto launcher = launcher_for(x);
  return run_forward(launcher, x, W, b, h0, lengths, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> recurrence_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& grad_h_n, const at::Tensor& output, const at::Tensor& W,
    const std::optional<at::Tensor>& h0, const std::optional<at::Tensor>& lengths, c10::string_view nonlinearity) {
  const c10::cuda::CUDAGuard guard(output.device());
  auto launcher = launcher_for(output);
  return run_backward(launcher, grad_output, grad_h_n, output, W, h0, lengths, nonlinearity);
}

}  // namespace
}  // namespace nnrnn::kern

namespace nnrnn::cuda {

std::string describe_path(int64_t N, int64_t B, c10::ScalarType dtype, int device) {
  const int count = c10::cuda::device_count();
  if (count == 0) return "unavailable: no CUDA device is visible";
  if (device < 0) device = c10::cuda::current_device();
  TORCH_CHECK_VALUE(device < count, "cuda_path: no CUDA device ", device, " (", count, " visible)");
  if (N == 0 || B == 0) return "empty: no kernel runs";
  const kern::Plan p = kern::cuda_plan(N, B, dtype, device);
  if (!p.persistent) return "fallback: " + p.reason;
  const int64_t acc = dtype == at::kDouble ? 8 : 4;
  const auto L = kern::make_layout(1, B, N, p.col_groups, p.row_groups, p.threads, p.rows_per_tile);
  const std::string forced = kern::plan_override();
  return std::string("persistent ") + kern::kKernelVersion + ": " + std::to_string(p.col_groups) + " x " +
         std::to_string(p.row_groups) + " blocks (column x row groups) of " + std::to_string(p.threads) +
         " threads, " + std::to_string(p.rows_per_tile) + " rows per tile, " +
         std::to_string(kern::shared_bytes(L, acc)) + " bytes of shared memory per block" +
         (forced.empty() ? "" : "; layout set by NNRNN_CUDA_PLAN=" + forced);
}

}  // namespace nnrnn::cuda

TORCH_LIBRARY_IMPL(nnrnn_fused, CUDA, m) {
  m.impl("recurrence", &nnrnn::kern::recurrence_cuda);
  m.impl("recurrence_backward", &nnrnn::kern::recurrence_backward_cuda);
}
