// Host emulation of a CUDA grid, for testing the kernel bodies of
// ../cuda/kernels.h and kernels_v2.h without a GPU: every thread of every block
// is a host thread; block, warp, cluster and grid barriers are real barriers
// (HostBarrier); each block has its own shared memory, filled with NaN bytes at
// the start so that a read of shared memory that no thread wrote shows in the
// results. Clusters are groups of consecutive blocks as on the GPU: a block can
// store into a peer's shared memory (st.async: the store lands, and counts its
// bytes on the peer's mbarrier, only when the peer next waits; the peer must have
// initialised that mbarrier before a cluster barrier the storing thread has passed,
// and a block may not exit with its stores in flight), and mbarriers (arrivals and transaction bytes,
// waits for a phase's parity) and step counters in global memory (release store,
// acquire wait) behave as the PTX instructions they stand for.
// The tensor-core path's mma.sync runs through a per-warp exchange area
// (warp_scratch(); ../cuda/mma.h says how).
//
// What it checks: indexing, the split of work over blocks and threads, the
// placement of barriers and waits (a missing one is a real race here too, though
// it may not fire on every run), the algorithm. What it cannot: warp-level
// behaviour beyond __syncwarp and mma.sync, the GPU memory model (here every barrier and wait
// is a full fence), timing.
//
// A wait that lasts longer than kHostWatchdog (a deadlock: an arrival that never
// comes) aborts the launch: every wait then returns at once, and host_launch
// throws once the threads have run out.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "../cuda/kernel_env.h"
#include "../cuda/mma.h"

namespace nnrnn::kern {

constexpr std::chrono::seconds kHostWatchdog{20};

// Set when a wait outlives kHostWatchdog; shared by all waits of one launch.
struct HostAbort {
  std::atomic<bool> aborted{false};
  std::mutex mutex;
  std::string what;
  void fail(const std::string& why) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!aborted.exchange(true)) what = why;
  }
};

// A reusable barrier for a fixed number of threads. C++17 on purpose (no
// std::barrier): the extension is built with the C++ standard of the user's torch,
// and torch 2.11's builder says -std=c++17. Each round has its own generation
// number, so a thread that leaves early cannot pass the next round's wait.
class HostBarrier {
 public:
  HostBarrier(std::ptrdiff_t count, HostAbort* abort) : count_(count), abort_(abort) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const unsigned long long generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      lock.unlock();
      all_arrived_.notify_all();
      return;
    }
    const auto deadline = std::chrono::steady_clock::now() + kHostWatchdog;
    while (generation_ == generation && !abort_->aborted) {
      if (all_arrived_.wait_until(lock, deadline) == std::cv_status::timeout && generation_ == generation) {
        abort_->fail("a barrier waited longer than the watchdog (a deadlock)");
      }
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  const std::ptrdiff_t count_;
  HostAbort* abort_;
  std::ptrdiff_t arrived_ = 0;
  unsigned long long generation_ = 0;
};

// An mbarrier: a phase completes when its `expected` arrivals have come and its
// transaction count (bytes expected minus bytes stored) is back to 0; waits test
// a phase's parity.
struct HostMbarrier {
  unsigned expected = 0, pending = 0;
  long long tx = 0;
  unsigned long long completed = 0;  // phases completed
  int init_epoch = 0;                // cluster barriers its initialising thread had passed
  void complete_if_done() {
    if (pending == 0 && tx == 0) {
      pending = expected;
      ++completed;
    }
  }
};

// An st.async in flight: it lands in the target block's shared memory, and counts
// its bytes on the target's mbarrier, only when that block next waits on an
// mbarrier (as late as the hardware may deliver it).
struct HostAsyncStore {
  int source, target;
  size_t offset, bar_offset;
  int size;
  unsigned char bytes[8];
};

struct HostGrid {
  HostGrid(int grid, int threads, size_t shared_bytes, int cluster, int warp)
      : grid_size(grid), block_size(threads), cluster_size(cluster), warp_size(warp),
        grid_barrier(static_cast<std::ptrdiff_t>(grid) * threads, &abort) {
    const int warps = (threads + warp - 1) / warp;
    for (int b = 0; b < grid; ++b) {
      block_barriers.push_back(std::make_unique<HostBarrier>(threads, &abort));
      for (int w = 0; w < warps; ++w)
        warp_barriers.push_back(std::make_unique<HostBarrier>(std::min(warp, threads - w * warp), &abort));
      shared.emplace_back(shared_bytes, static_cast<unsigned char>(0xFF));  // NaN in float and double
      mma_scratch.resize(mma_scratch.size() + warps);
    }
    for (int c = 0; c < grid / cluster; ++c)
      cluster_barriers.push_back(std::make_unique<HostBarrier>(static_cast<std::ptrdiff_t>(cluster) * threads, &abort));
  }
  int grid_size, block_size, cluster_size, warp_size;
  HostAbort abort;
  HostBarrier grid_barrier;
  std::vector<std::unique_ptr<HostBarrier>> block_barriers, warp_barriers, cluster_barriers;
  std::vector<std::vector<unsigned char>> shared;
  // Per warp: the exchange area of the emulated mma.sync (../cuda/mma.h), zeroed.
  std::vector<MmaWarpScratch> mma_scratch;
  // mbarriers by (block, offset in its shared memory), and the st.async stores in flight
  std::mutex mbar_mutex;
  std::condition_variable mbar_changed;
  std::map<std::pair<int, size_t>, HostMbarrier> mbars;
  std::vector<HostAsyncStore> in_flight;

  // Lands the stores in flight to `block` (mbar_mutex held).
  void land_stores(int block) {
    for (size_t i = 0; i < in_flight.size();) {
      const HostAsyncStore& st = in_flight[i];
      if (st.target != block) {
        ++i;
        continue;
      }
      HostMbarrier& bar = mbars.at({st.target, st.bar_offset});  // checked when the store was issued
      std::memcpy(shared[st.target].data() + st.offset, st.bytes, st.size);
      bar.tx -= st.size;
      bar.complete_if_done();
      in_flight.erase(in_flight.begin() + static_cast<std::ptrdiff_t>(i));
    }
  }

  // A block's thread has returned: none of the block's stores may still be in flight
  // (on the GPU a block must not exit before its distributed shared memory accesses complete).
  void check_exit(int block) {
    std::lock_guard<std::mutex> lock(mbar_mutex);
    for (const HostAsyncStore& st : in_flight)
      if (st.source == block) {
        abort.fail("a block exited while its stores into a peer's shared memory were in flight");
        return;
      }
  }
};

class HostEnv {
 public:
  HostEnv(HostGrid* g, int block, int thread) : g_(g), block_(block), thread_(thread) {}
  int thread() const { return thread_; }
  int threads() const { return g_->block_size; }
  int block() const { return block_; }
  int blocks() const { return g_->grid_size; }
  void sync_block() const { g_->block_barriers[block_]->arrive_and_wait(); }
  void sync_grid() const { g_->grid_barrier.arrive_and_wait(); }
  // The warp's exchange area for the emulated mma.sync (../cuda/mma.h); 32-thread warps.
  void* warp_scratch() const {
    const int warps = (g_->block_size + g_->warp_size - 1) / g_->warp_size;
    return &g_->mma_scratch[block_ * warps + thread_ / g_->warp_size];
  }
  void sync_warp() const {
    const int warps = (g_->block_size + g_->warp_size - 1) / g_->warp_size;
    g_->warp_barriers[block_ * warps + thread_ / g_->warp_size]->arrive_and_wait();
  }
  template <typename T>
  T* shared() const {
    return reinterpret_cast<T*>(g_->shared[block_].data());
  }

  // ---- clusters
  void sync_cluster() const {
    g_->cluster_barriers[block_ / g_->cluster_size]->arrive_and_wait();
    ++cluster_epoch_;
  }
  // The GPU may count the bytes on the peer's mbarrier as soon as the store is issued: the
  // peer must have initialised it before a cluster barrier that this thread has passed since.
  template <typename T>
  void store_async_peer(T* local, int rank, T v, uint64_t* bar) const {
    HostAsyncStore store{block_, peer_block(rank), offset(local), offset(bar), static_cast<int>(sizeof(T)), {}};
    std::memcpy(store.bytes, &v, sizeof(T));
    std::lock_guard<std::mutex> lock(g_->mbar_mutex);
    auto it = g_->mbars.find({store.target, store.bar_offset});
    if (it == g_->mbars.end() || it->second.init_epoch >= cluster_epoch_) {
      g_->abort.fail("st.async into a peer whose mbarrier was not initialised before a cluster barrier");
      return;
    }
    g_->in_flight.push_back(store);
  }
  void mbar_init(uint64_t* bar, unsigned count) const {
    std::lock_guard<std::mutex> lock(g_->mbar_mutex);
    g_->mbars[{block_, offset(bar)}] = HostMbarrier{count, count, 0, 0, cluster_epoch_};
  }
  void mbar_expect(uint64_t* bar, unsigned bytes) const {
    {
      std::lock_guard<std::mutex> lock(g_->mbar_mutex);
      auto it = g_->mbars.find({block_, offset(bar)});
      if (it == g_->mbars.end()) {
        g_->abort.fail("arrival on an mbarrier that was not initialised");
        return;
      }
      it->second.tx += bytes;
      --it->second.pending;
      it->second.complete_if_done();
    }
    g_->mbar_changed.notify_all();
  }
  // The phase of parity `parity` has completed when the current (incomplete) phase has the other parity.
  void mbar_wait(uint64_t* bar, uint32_t parity) const {
    std::unique_lock<std::mutex> lock(g_->mbar_mutex);
    auto it = g_->mbars.find({block_, offset(bar)});
    if (it == g_->mbars.end()) {
      g_->abort.fail("wait on an mbarrier that was not initialised");
      return;
    }
    const HostMbarrier& m = it->second;
    const auto deadline = std::chrono::steady_clock::now() + kHostWatchdog;
    for (g_->land_stores(block_); (m.completed & 1) == parity && !g_->abort.aborted; g_->land_stores(block_)) {
      // short waits: stores issued meanwhile land only when this block looks
      if (g_->mbar_changed.wait_for(lock, std::chrono::milliseconds(1)) == std::cv_status::timeout &&
          std::chrono::steady_clock::now() > deadline)
        g_->abort.fail("an mbarrier wait lasted longer than the watchdog (a deadlock)");
    }
  }

  // ---- step counters in global memory
  void flag_publish(unsigned long long* flag, unsigned long long value) const {
    __atomic_store_n(flag, value, __ATOMIC_RELEASE);
  }
  unsigned arrive(unsigned* count) const { return __atomic_fetch_add(count, 1u, __ATOMIC_ACQ_REL); }
  void flag_wait(unsigned long long* flag, unsigned long long value) const {
    const auto deadline = std::chrono::steady_clock::now() + kHostWatchdog;
    while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) < value && !g_->abort.aborted) {
      if (std::chrono::steady_clock::now() > deadline) g_->abort.fail("a step counter wait lasted longer than the watchdog");
      std::this_thread::yield();
    }
  }
  template <typename T>
  T load_cg(const T* p) const {
    return *p;
  }
  template <typename T>
  void copy16_cg(T* dst, const T* src) const {
    std::memcpy(dst, src, 16);
  }

 private:
  size_t offset(const void* p) const {
    return static_cast<size_t>(reinterpret_cast<const unsigned char*>(p) - g_->shared[block_].data());
  }
  int peer_block(int rank) const { return block_ / g_->cluster_size * g_->cluster_size + rank; }
  unsigned char* peer_bytes(const void* local, int rank) const {
    return g_->shared[peer_block(rank)].data() + offset(local);
  }

  HostGrid* g_;
  int block_, thread_;
  mutable int cluster_epoch_ = 0;  // cluster barriers this thread has passed
};

// Runs body(env) on grid x threads host threads, like a kernel launch (with
// clusters of `cluster` consecutive blocks and warps of `warp` threads), and waits.
template <class Body>
void host_launch(int grid, int threads, size_t shared_bytes, const Body& body, int cluster = 1, int warp = 32) {
  HostGrid g(grid, threads, shared_bytes, cluster, warp);
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(grid) * threads);
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < threads; ++t)
      workers.emplace_back([&g, &body, b, t] {
        HostEnv env(&g, b, t);
        body(env);
        g.check_exit(b);
      });
  for (auto& w : workers) w.join();
  if (g.abort.aborted) throw std::runtime_error("emulated launch aborted: " + g.abort.what);
}

}  // namespace nnrnn::kern
