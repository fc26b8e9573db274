// The few things a kernel body of kernels.h uses from its execution environment:
// thread and block index, block barrier, grid barrier, shared memory.
//
// nvcc: DeviceEnv below, the real thing. g++: HostEnv (../cpu/host_grid.h), which
// runs a grid's blocks and threads as host threads with real barriers, so that
// the same kernel source is tested on a machine without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define NNRNN_DEV __device__ __forceinline__
#else
#define NNRNN_DEV inline
#endif

#if defined(__CUDACC__)
#include <cuda/atomic>

namespace nnrnn::kern {

struct DeviceEnv {
  // Grid barrier: a 64-bit counter, zeroed before the launch, that every block
  // increments once per barrier. The k-th barrier is passed when the counter
  // reaches k * gridDim.x. One atomic and one spinning thread per block; cheaper
  // than cooperative_groups' grid.sync() and needs no reset between barriers.
  // Co-residency of all blocks is guaranteed by the cooperative launch.
  //
  // Deadlock watchdog: with watchdog_ns > 0, a block that waits longer than that
  // at one grid barrier executes __trap(): a deadlock (a block that never
  // arrives) becomes a launch error that the host sees ("unspecified launch
  // failure"; the CUDA context is lost) instead of a hang. The bound is read off
  // %globaltimer (nanoseconds), only while spinning. 0: off.
  unsigned long long* counter;
  unsigned long long watchdog_ns;
  unsigned long long passed = 0;

  __device__ DeviceEnv(unsigned long long* c, unsigned long long watchdog) : counter(c), watchdog_ns(watchdog) {}

  __device__ int thread() const { return static_cast<int>(threadIdx.x); }
  __device__ int threads() const { return static_cast<int>(blockDim.x); }
  __device__ int block() const { return static_cast<int>(blockIdx.x); }
  __device__ int blocks() const { return static_cast<int>(gridDim.x); }

  __device__ void sync_block() const { __syncthreads(); }

  __device__ void sync_grid() {
    __syncthreads();  // the block's writes happen before thread 0's release
    ++passed;
    if (threadIdx.x == 0) {
      __threadfence();  // as cooperative_groups does: the block's writes visible device-wide
      ::cuda::atomic_ref<unsigned long long, ::cuda::thread_scope_device> c(*counter);
      c.fetch_add(1, ::cuda::memory_order_release);
      const unsigned long long target = passed * gridDim.x;
      const unsigned long long start = watchdog_ns ? global_ns() : 0;
      while (c.load(::cuda::memory_order_acquire) < target) {
        if (watchdog_ns && global_ns() - start > watchdog_ns) __trap();
      }
    }
    __syncthreads();  // thread 0's acquire happens before the block's next reads
  }

  __device__ static unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }

  template <typename T>
  __device__ T* shared() const {
    extern __shared__ __align__(16) unsigned char nnrnn_shared_memory[];
    return reinterpret_cast<T*>(nnrnn_shared_memory);
  }
};

}  // namespace nnrnn::kern
#endif
