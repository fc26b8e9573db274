// The __global__ entry points of the persistent kernels (nvcc only): included by
// recurrence_cuda.cu and by the static check's standalone translation unit
// (benchmarks/static_check.cu), so that both compile the same kernels.
#pragma once

#include "kernels.h"
#include "kernels_v2.h"
#include "tc_kernels.h"

namespace nnrnn::kern {

constexpr int kThreads = 512;  // per block of kernel v1

// watchdog: nanoseconds after which a wait traps (kernel_env.h); 0: off.
template <class Body>
__global__ void __launch_bounds__(kThreads) persistent_kernel(Body body, unsigned long long watchdog) {
  DeviceEnv env(body.barrier, watchdog);
  body(env);
}

template <class Body>
__global__ void __launch_bounds__(kV2MaxThreads) team_kernel(Body body, unsigned long long watchdog) {
  DeviceEnv env(nullptr, watchdog);
  body(env);
}

// The tensor-core path (tc_kernels.h).
template <class Body>
__global__ void __launch_bounds__(kTcMaxThreads) tc_kernel(Body body, unsigned long long watchdog) {
  DeviceEnv env(nullptr, watchdog);
  body(env);
}

}  // namespace nnrnn::kern
