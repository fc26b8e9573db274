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
#include <vector>

#include "driver.h"
#include "global_kernels.cuh"
#include "path.h"

namespace nnrnn::kern {
namespace {

constexpr int kPointwiseThreads = 256;

template <class Body>
__global__ void pointwise_kernel(Body body) {
  DeviceEnv env(nullptr, 0);
  body(env);
}

template <typename scalar_t>
using Forward = PersistentForward<scalar_t, at::opmath_type<scalar_t>>;
template <typename scalar_t>
using Backward = PersistentBackward<scalar_t, at::opmath_type<scalar_t>>;
// Kernel v2: float32 and float64 (scalar_t is its own accumulation type).
template <typename scalar_t, Exchange ex>
using ForwardTeam = TeamKernel<DeviceTileShape<scalar_t>, ForwardV2<scalar_t, scalar_t>, ex>;
template <typename scalar_t, Exchange ex>
using BackwardTeam = TeamKernel<DeviceTileShape<scalar_t>, BackwardV2<scalar_t, scalar_t>, ex>;

// The forward and backward v2 kernels of one dtype and exchange.
template <typename scalar_t, Exchange ex>
std::vector<const void*> team_kernels() {
  return {reinterpret_cast<const void*>(&team_kernel<ForwardTeam<scalar_t, ex>>),
          reinterpret_cast<const void*>(&team_kernel<BackwardTeam<scalar_t, ex>>)};
}

// The tensor-core path: float16, bfloat16, float32 (TF32); float32 accumulation.
template <typename scalar_t, int KT, Exchange ex>
using ForwardTc = TcTeamKernel<tc_kind<scalar_t>(), KT, ForwardV2<scalar_t, float>, ex>;
template <typename scalar_t, int KT, Exchange ex>
using BackwardTc = TcTeamKernel<tc_kind<scalar_t>(), KT, BackwardV2<scalar_t, float>, ex>;

template <typename scalar_t, int KT>
std::vector<const void*> tc_kernels_kt(Exchange ex) {
  auto pair = [](auto forward, auto backward) {
    return std::vector<const void*>{reinterpret_cast<const void*>(forward), reinterpret_cast<const void*>(backward)};
  };
  switch (ex) {
    case Exchange::Block:
      return pair(&tc_kernel<ForwardTc<scalar_t, KT, Exchange::Block>>,
                  &tc_kernel<BackwardTc<scalar_t, KT, Exchange::Block>>);
    case Exchange::Cluster:
      return pair(&tc_kernel<ForwardTc<scalar_t, KT, Exchange::Cluster>>,
                  &tc_kernel<BackwardTc<scalar_t, KT, Exchange::Cluster>>);
    default:
      return pair(&tc_kernel<ForwardTc<scalar_t, KT, Exchange::Grid>>,
                  &tc_kernel<BackwardTc<scalar_t, KT, Exchange::Grid>>);
  }
}

// The forward and backward tensor-core kernels of one dtype, KT and exchange.
std::vector<const void*> tc_kernels(at::ScalarType dtype, int kt, Exchange ex) {
  std::vector<const void*> kernels;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nnrnn_tc_kernels", [&] {
    if constexpr (!std::is_same<scalar_t, double>::value) {
      kernels = kt == kTcKtSmall ? tc_kernels_kt<scalar_t, kTcKtSmall>(ex) : tc_kernels_kt<scalar_t, kTcKtLarge>(ex);
    }
  });
  return kernels;
}

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

// NNRNN_CUDA_KERNEL: auto (default: the cost model picks), v1 or v2 (that kernel
// wherever it fits, to measure the two side by side); NNRNN_CUDA_PLAN implies v1.
KernelChoice kernel_choice() {
  const char* v = std::getenv("NNRNN_CUDA_KERNEL");
  return effective_choice(parse_kernel_choice(v ? std::string(v) : std::string(), "NNRNN_CUDA_KERNEL"));
}

// Kernel v1's plan for (N, B, dtype) on `device`, or the reason it does not fit.
Plan v1_plan(int64_t N, int64_t B, at::ScalarType dtype, int device, const DeviceModel& d) {
  if (!d.cooperative) {
    Plan p;
    p.reason = "the device does not support cooperative launches";
    return p;
  }
  const int64_t acc = dtype == at::kDouble ? 8 : 4;
  Plan p = persistent_plan(N, B, acc, d.sms, d.smem_per_block, kThreads);
  if (!p.persistent) return p;
  const int grid = p.col_groups * p.row_groups;
  const int64_t bytes =
      shared_bytes(make_layout(1, B, N, p.col_groups, p.row_groups, kThreads, p.rows_per_tile), acc);

  // Every block of the grid must be resident at once (the grid barrier would
  // otherwise wait forever; the cooperative launch would refuse it).
  int per_sm = 1 << 30;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "nnrnn_cuda_plan", [&] {
    for (const void* kernel : {reinterpret_cast<const void*>(&persistent_kernel<Forward<scalar_t>>),
                               reinterpret_cast<const void*>(&persistent_kernel<Backward<scalar_t>>)}) {
      // Allow the device's maximum once; a launch passes its own size.
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(d.smem_per_block)));
      int n = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, bytes));
      per_sm = std::min(per_sm, n);
    }
  });
  if (static_cast<int64_t>(per_sm) * d.sms < grid) {
    p.persistent = false;
    p.reason = "only " + std::to_string(per_sm) + " block(s) per SM x " + std::to_string(d.sms) +
               " SMs can be co-resident with " + std::to_string(bytes) + " bytes of shared memory, the grid needs " +
               std::to_string(grid);
  }
  return p;
}

// Sets the attributes kernel v2 needs on `kernel` (the device's whole shared
// memory; clusters of 16 where the device allows them).
void prepare_team_kernel(const void* kernel, const DeviceModel& d) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(d.smem_per_block)));
  if (d.clusters) {
    // Refused where the device has no non-portable sizes: then clusters stay at 8 (the plan asks the occupancy).
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess)
      (void)cudaGetLastError();
  }
}

// Kernel v2's plan on `device`: the model's choice with the device's figures
// (registers of the compiled kernels, resident clusters of each size), then the
// Grid exchange's co-residency checked with the occupancy calculator.
Plan v2_plan(int64_t N, int64_t B, at::ScalarType dtype, DeviceModel d) {
  if (dtype != at::kFloat && dtype != at::kDouble) return v2_plan_for(N, B, dtype, d);
  std::vector<const void*> block, cluster, grid;
  AT_DISPATCH_FLOATING_TYPES(dtype, "nnrnn_cuda_v2_plan", [&] {
    block = team_kernels<scalar_t, Exchange::Block>();
    cluster = team_kernels<scalar_t, Exchange::Cluster>();
    grid = team_kernels<scalar_t, Exchange::Grid>();
  });
  const int64_t acc = dtype == at::kDouble ? 8 : 4;
  for (const auto* kernels : {&block, &cluster, &grid})
    for (const void* kernel : *kernels) {
      prepare_team_kernel(kernel, d);
      cudaFuncAttributes attr{};
      C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
      d.v2_regs = std::max(d.v2_regs, attr.numRegs);
    }
  if (d.clusters) {
    for (int C = 2; C <= 16; C *= 2) {
      if (C > N) break;
      Plan one;  // one row per team: the smallest block of a cluster of C
      one.exchange = Exchange::Cluster;
      one.col_groups = C;
      const LayoutV2 L = device_v2_layout(1, N, acc, one);
      if (L.threads() > kV2MaxThreads) continue;
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(C);
      config.blockDim = dim3(L.threads());
      config.dynamicSmemBytes = L.shared_bytes(acc);
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = C;
      attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
      config.attrs = &attr;
      config.numAttrs = 1;
      int fewest = 1 << 30;
      for (const void* kernel : cluster) {
        int n = 0;
        if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) {
          (void)cudaGetLastError();  // a size the device refuses: none
          n = 0;
        }
        fewest = std::min(fewest, n);
      }
      d.active_clusters[C] = std::max(fewest, 0);
      if (C == 16 && fewest < 1) d.max_cluster = 8;
    }
  }
  Plan p = v2_plan_for(N, B, dtype, d);
  if (p.persistent && p.exchange == Exchange::Grid) {
    const LayoutV2 L = device_v2_layout(B, N, acc, p);
    int per_sm = 1 << 30;
    for (const void* kernel : grid) {
      int n = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, L.threads(), L.shared_bytes(acc)));
      per_sm = std::min(per_sm, n);
    }
    if (static_cast<int64_t>(per_sm) * d.sms < L.grid()) {  // the estimate was off: plan without the Grid exchange
      d.cooperative = false;
      p = v2_plan_for(N, B, dtype, d);
    }
  }
  return p;
}

// The tensor-core path's plan on the device: the model's choice with the device's
// figures, then checked with the occupancy calculator (its kernels' attributes set
// as kernel v2's are); where the check fails, the reason.
Plan tc_plan(int64_t N, int64_t B, at::ScalarType dtype, DeviceModel d) {
  Plan p = tc_plan_for(N, B, dtype, tf32_allowed_by_torch(), d);
  if (!p.persistent) return p;
  const TcLayout L = tc_layout(1, B, N, p.exchange, p.col_groups, p.row_groups, p.rows_per_tile, p.kt,
                               dtype == at::kHalf ? MmaKind::F16 : dtype == at::kBFloat16 ? MmaKind::BF16 : MmaKind::TF32);
  int fewest = 1 << 30;
  for (const void* kernel : tc_kernels(dtype, p.kt, p.exchange)) {
    prepare_team_kernel(kernel, d);
    int n = 0;
    if (p.exchange == Exchange::Cluster) {
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(L.grid());
      config.blockDim = dim3(L.threads());
      config.dynamicSmemBytes = L.shared_bytes();
      cudaLaunchAttribute attr{};
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = L.team_blocks;
      attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
      config.attrs = &attr;
      config.numAttrs = 1;
      if (cudaOccupancyMaxActiveClusters(&n, kernel, &config) != cudaSuccess) {
        (void)cudaGetLastError();  // a size the device refuses: none
        n = 0;
      }
    } else {
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, L.threads(), L.shared_bytes()));
      if (p.exchange == Exchange::Grid) n *= d.sms;  // blocks resident at once
    }
    fewest = std::min(fewest, n);
  }
  const int needed = p.exchange == Exchange::Grid ? L.grid() : 1;
  if (fewest < needed && p.exchange == Exchange::Cluster && L.team_blocks > 8 && d.max_cluster > 8) {
    d.max_cluster = 8;  // clusters of 16 (non-portable) refused: plan with at most 8, as v2_plan does
    return tc_plan(N, B, dtype, d);
  }
  if (fewest < needed) {
    p.persistent = false;
    p.reason = "tensor-core path: its layout (" + describe(p) + ") does not fit on the device (" +
               std::to_string(fewest) + (p.exchange == Exchange::Cluster ? " clusters" : " blocks") +
               " resident, " + std::to_string(needed) + " needed)";
  }
  return p;
}

// The plan for (N, B, dtype) on `device`: the tensor-core path, kernel v2, v1 or
// the fallback (plan.h, tc_plan.h).
Plan compute_plan(int64_t N, int64_t B, at::ScalarType dtype, int device, KernelChoice choice) {
  c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
  DeviceModel d;
  d.sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  d.smem_per_block = device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  d.smem_per_sm = device_attribute(cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  d.regs_per_sm = device_attribute(cudaDevAttrMaxRegistersPerMultiprocessor, device);
  d.max_threads_per_sm = device_attribute(cudaDevAttrMaxThreadsPerMultiProcessor, device);
  d.cooperative = device_attribute(cudaDevAttrCooperativeLaunch, device) != 0;
  d.clusters = device_attribute(cudaDevAttrComputeCapabilityMajor, device) >= 9 &&
               device_attribute(cudaDevAttrClusterLaunch, device) != 0;
  d.v2_regs = 0;
  const Plan v2 = v2_plan(N, B, dtype, d);
  const Plan v1 = v1_plan(N, B, dtype, device, d);
  const Plan tc = tc_plan(N, B, dtype, d);
  return pick_plan_with_tc(tc, v2, v1, B, N, choice);
}

struct PlanCache {
  // device, N, B, dtype, kernel choice, NNRNN_CUDA_PLAN, NNRNN_CUDA_TEAMS, TF32 allowed
  using Key = std::tuple<int, int64_t, int64_t, int, int, std::string, std::string, bool>;
  std::mutex mutex;
  std::map<Key, Plan> plans;
};

PlanCache& plan_cache() {
  static PlanCache cache;
  return cache;
}

// Everything a plan depends on besides the device's figures (the settings are read at every call).
PlanCache::Key plan_key(int64_t N, int64_t B, at::ScalarType dtype, int device) {
  return PlanCache::Key{device, N, B, static_cast<int>(dtype), static_cast<int>(kernel_choice()), plan_override(),
                        team_override().spec, tf32_allowed_by_torch()};
}

Plan cuda_plan(int64_t N, int64_t B, at::ScalarType dtype, int device) {
  if (fallback_forced()) {
    Plan p;
    p.reason = "forced by NNRNN_CUDA_FORCE_FALLBACK";
    const StepCost cost = fallback_cost(B, N);
    p.forward_us = cost.forward_us;
    p.backward_us = cost.backward_us;
    return p;
  }
  // Cached: the occupancy queries cost microseconds.
  PlanCache& c = plan_cache();
  const PlanCache::Key key = plan_key(N, B, dtype, device);
  std::lock_guard<std::mutex> lock(c.mutex);
  auto it = c.plans.find(key);
  if (it == c.plans.end()) it = c.plans.emplace(key, compute_plan(N, B, dtype, device, kernel_choice())).first;
  return it->second;
}

// After the device refused a shape's cooperative or cluster launch: the fallback from now on.
void record_refusal(int64_t N, int64_t B, at::ScalarType dtype, int device, const std::string& why) {
  Plan p;
  p.reason = "the device refused the launch (" + why + ")";
  const StepCost cost = fallback_cost(B, N);
  p.forward_us = cost.forward_us;
  p.backward_us = cost.backward_us;
  PlanCache& c = plan_cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.plans[plan_key(N, B, dtype, device)] = p;
}

// Why a launch was refused, after recording it; "" for success. Too many blocks to
// be co-resident now (MPS, SMs held by others), no cooperative launch, or a cluster
// size the device does not take: the caller takes the fallback. Other errors raise.
std::string refusal(cudaError_t err, int64_t N, int64_t B, at::ScalarType dtype, int device) {
  if (err == cudaErrorCooperativeLaunchTooLarge || err == cudaErrorNotSupported ||
      err == cudaErrorInvalidClusterSize) {
    (void)cudaGetLastError();  // not a sticky error: clear it for the next launch
    const std::string why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    record_refusal(N, B, dtype, device, why);
    return why;
  }
  C10_CUDA_CHECK(err);
  return "";
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
    return refusal(err, L.N, L.B, dtype, device);
  }

  template <typename acc_t>
  using V2Shape = DeviceTileShape<acc_t>;

  // Kernel v2 and the tensor-core path: a plain launch (Block), a launch in clusters
  // of team_blocks (Cluster), or a cooperative launch, all blocks resident (Grid).
  template <class Body>
  std::string launch_team(void (*kernel)(Body, unsigned long long), const Body& body, int grid, int threads,
                          size_t bytes, Exchange exchange, int team_blocks, int64_t N, int64_t B) const {
    cudaLaunchConfig_t config{};
    config.gridDim = dim3(grid);
    config.blockDim = dim3(threads);
    config.dynamicSmemBytes = bytes;
    config.stream = stream;
    cudaLaunchAttribute attr{};
    if (exchange == Exchange::Cluster) {
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = team_blocks;
      attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
      config.attrs = &attr;
      config.numAttrs = 1;
    } else if (exchange == Exchange::Grid) {
      attr.id = cudaLaunchAttributeCooperative;
      attr.val.cooperative = 1;
      config.attrs = &attr;
      config.numAttrs = 1;
    }
    // The attributes were set when the plan was made (prepare_team_kernel).
    const cudaError_t err = cudaLaunchKernelEx(&config, kernel, body, watchdog_ns());
    return refusal(err, N, B, dtype, device);
  }

  template <class Body>
  std::string team(const Body& body, const LayoutV2& L, size_t bytes) const {
    return launch_team(&team_kernel<Body>, body, L.grid(), L.threads(), bytes, L.exchange, L.team_blocks, L.N, L.B);
  }

  static constexpr bool kHostEmulation = false;
  using TcKts = KtList<kTcKtSmall, kTcKtLarge>;

  template <class Body>
  std::string tc(const Body& body, const TcLayout& L) const {
    return launch_team(&tc_kernel<Body>, body, L.grid(), L.threads(), static_cast<size_t>(L.shared_bytes()),
                       L.exchange, L.team_blocks, L.N, L.B);
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
  return kern::describe(kern::cuda_plan(N, B, dtype, device));
}

}  // namespace nnrnn::cuda

TORCH_LIBRARY_IMPL(nnrnn_fused, CUDA, m) {
  m.impl("recurrence", &nnrnn::kern::recurrence_cuda);
  m.impl("recurrence_backward", &nnrnn::kern::recurrence_backward_cuda);
}
