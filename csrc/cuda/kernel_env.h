// The few things a kernel body of kernels.h / kernels_v2.h uses from its execution
// environment: thread and block index, block, warp and grid barriers, shared
// memory; for kernel v2 also clusters (rank, barrier, stores into a peer's shared
// memory, mbarriers) and step counters in global memory (release / acquire).
//
// nvcc: DeviceEnv below, the real thing. g++: HostEnv (../cpu/host_grid.h), which
// runs a grid's blocks and threads as host threads with real barriers, so that
// the same kernel source is tested on a machine without a GPU.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define NNRNN_DEV __device__ __forceinline__
#else
#define NNRNN_DEV inline
#endif

namespace nnrnn::kern {

// 16 bytes of shared memory into registers: one LDS.128 on the device.
#if defined(__CUDACC__)
template <typename T>
struct Vec16;
template <>
struct Vec16<float> {
  using type = float4;
};
template <>
struct Vec16<double> {
  using type = double2;
};
template <typename T, int n>
NNRNN_DEV void load16(T (&dst)[n], const T* src) {
  static_assert(n * sizeof(T) == 16, "16 bytes");
  *reinterpret_cast<typename Vec16<T>::type*>(dst) = *reinterpret_cast<const typename Vec16<T>::type*>(src);
}
#else
template <typename T, int n>
inline void load16(T (&dst)[n], const T* src) {
  static_assert(n * sizeof(T) == 16, "16 bytes");
  std::memcpy(dst, src, 16);
}
#endif

}  // namespace nnrnn::kern

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
    // Why one release and one acquire are enough (no __threadfence, which made a
    // second GPU-scope fence per step): the block's writes happen before thread 0's
    // release by the block barrier, and causality order is transitive in the PTX
    // memory model; another block's acquire that reads this increment (or a later
    // one in its release sequence) then orders them before that block's reads,
    // which its own block barrier below extends to all its threads.
    __syncthreads();
    ++passed;
    if (threadIdx.x == 0) {
      ::cuda::atomic_ref<unsigned long long, ::cuda::thread_scope_device> c(*counter);
      c.fetch_add(1, ::cuda::memory_order_release);
      const unsigned long long target = passed * gridDim.x;
      unsigned long long start = 0;
      while (c.load(::cuda::memory_order_acquire) < target) watchdog_tick(start);
    }
    __syncthreads();  // thread 0's acquire happens before the block's next reads
  }

  __device__ static unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
  }

  // Called in every spin loop of a wait; traps after watchdog_ns of waiting.
  __device__ void watchdog_tick(unsigned long long& start) const {
    if (!watchdog_ns) return;
    const unsigned long long now = global_ns();
    if (!start) start = now;
    else if (now - start > watchdog_ns) __trap();
  }

  __device__ void sync_warp() const { __syncwarp(); }

  // ---- thread-block clusters (sm_90 only; kernel v2's Exchange::Cluster). A
  // cluster is gridDim.x / clusterDim.x groups of consecutive blocks, so a
  // block's rank in its cluster is blockIdx.x % cluster size.
  __device__ static uint32_t shared_address(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
  }
  __device__ static uint32_t peer_address(const void* local, int rank) {
    uint32_t remote = 0;
#if __CUDA_ARCH__ >= 900
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(shared_address(local)), "r"(rank));
#else
    __trap();
#endif
    return remote;
  }

  // Every thread of the cluster arrives (release) and waits (acquire).
  __device__ void sync_cluster() const {
#if __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release;\n\tbarrier.cluster.wait.acquire;" ::: "memory");
#else
    __trap();
#endif
  }

  // Stores v at `local`'s offset in the shared memory of the cluster's block `rank`
  // and signals the mbarrier at `bar`'s offset there with the store's bytes
  // (st.async: no fence; the data is visible to whoever sees that phase complete).
  template <typename T>
  __device__ void store_async_peer(T* local, int rank, T v, uint64_t* bar) const {
#if __CUDA_ARCH__ >= 900
    const uint32_t remote = peer_address(local, rank), remote_bar = peer_address(bar, rank);
    if constexpr (sizeof(T) == 4) {  // float, or two 16-bit operands (the tensor-core path)
      uint32_t bits;
      memcpy(&bits, &v, 4);
      asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];" ::"r"(remote),
                   "r"(bits), "r"(remote_bar)
                   : "memory");
    } else {
      static_assert(sizeof(T) == 8, "4 or 8 bytes");
      unsigned long long bits;
      memcpy(&bits, &v, 8);
      asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b64 [%0], %1, [%2];" ::"r"(remote),
                   "l"(bits), "r"(remote_bar)
                   : "memory");
    }
#else
    __trap();
#endif
  }

  // An mbarrier in this block's shared memory expecting `count` arrivals per phase,
  // visible to the cluster once the cluster barrier that follows is passed.
  __device__ void mbar_init(uint64_t* bar, unsigned count) const {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(count) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
#else
    __trap();
#endif
  }

  // One arrival on the local mbarrier, which also expects `bytes` more of stores (st.async) in this phase.
  __device__ void mbar_expect(uint64_t* bar, unsigned bytes) const {
#if __CUDA_ARCH__ >= 900
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
                 : "memory");
#else
    __trap();
#endif
  }

  // Until the phase of parity `parity` of the local mbarrier has completed.
  __device__ void mbar_wait(uint64_t* bar, uint32_t parity) const {
#if __CUDA_ARCH__ >= 900
    const uint32_t address = shared_address(bar);
    unsigned long long start = 0;
    for (;;) {
      uint32_t done;
      asm volatile(
          "{\n\t.reg .pred p;\n\t"
          "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
          "selp.b32 %0, 1, 0, p;\n\t}"
          : "=r"(done)
          : "r"(address), "r"(parity)
          : "memory");
      if (done) return;
      watchdog_tick(start);
    }
#else
    __trap();
#endif
  }

  // ---- step counters in global memory (the Grid exchange), and a block's count of warps
  __device__ void flag_publish(unsigned long long* flag, unsigned long long value) const {
    ::cuda::atomic_ref<unsigned long long, ::cuda::thread_scope_device>(*flag).store(value, ::cuda::memory_order_release);
  }
  // A count in shared memory: adds 1 (release and acquire, block scope); returns the count before.
  __device__ unsigned arrive(unsigned* count) const {
    return ::cuda::atomic_ref<unsigned, ::cuda::thread_scope_block>(*count).fetch_add(1u, ::cuda::memory_order_acq_rel);
  }
  __device__ void flag_wait(unsigned long long* flag, unsigned long long value) const {
    ::cuda::atomic_ref<unsigned long long, ::cuda::thread_scope_device> f(*flag);
    unsigned long long start = 0;
    while (f.load(::cuda::memory_order_acquire) < value) watchdog_tick(start);
  }
  // Loads of data another block published (after a flag_wait): from L2, not L1.
  template <typename T>
  __device__ T load_cg(const T* p) const {
    return __ldcg(p);
  }
  template <typename T>
  __device__ void copy16_cg(T* dst, const T* src) const {
    *reinterpret_cast<int4*>(dst) = __ldcg(reinterpret_cast<const int4*>(src));
  }

  template <typename T>
  __device__ T* shared() const {
    extern __shared__ __align__(16) unsigned char nnrnn_shared_memory[];
    return reinterpret_cast<T*>(nnrnn_shared_memory);
  }
};

}  // namespace nnrnn::kern
#endif
