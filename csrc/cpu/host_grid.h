// Host emulation of a CUDA grid, for testing the kernel bodies of
// ../cuda/kernels.h without a GPU: every thread of every block is a host thread,
// the block barrier and the grid barrier are real barriers (HostBarrier), and
// each block has its own shared memory, filled with NaN bytes at the start so
// that a read of shared memory that no thread wrote shows in the results.
//
// What it checks: indexing, the split of work over blocks and threads, the
// placement of barriers (a missing one is a real race here too, though it may
// not fire on every run), the algorithm. What it cannot: warp-level behaviour,
// the GPU memory model (here every barrier is a full fence), timing.
#pragma once

#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "../cuda/kernel_env.h"

namespace nnrnn::kern {

// A reusable barrier for a fixed number of threads. C++17 on purpose (no
// std::barrier): the extension is built with the C++ standard of the user's torch,
// and torch 2.11's builder says -std=c++17. Each round has its own generation
// number, so a thread that leaves early cannot pass the next round's wait.
class HostBarrier {
 public:
  explicit HostBarrier(std::ptrdiff_t count) : count_(count) {}
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
    all_arrived_.wait(lock, [&] { return generation_ != generation; });
  }

 private:
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  const std::ptrdiff_t count_;
  std::ptrdiff_t arrived_ = 0;
  unsigned long long generation_ = 0;
};

struct HostGrid {
  HostGrid(int grid, int threads, size_t shared_bytes)
      : grid_size(grid), block_size(threads), grid_barrier(static_cast<std::ptrdiff_t>(grid) * threads) {
    for (int b = 0; b < grid; ++b) {
      block_barriers.push_back(std::make_unique<HostBarrier>(threads));
      shared.emplace_back(shared_bytes, static_cast<unsigned char>(0xFF));  // NaN in float and double
    }
  }
  int grid_size, block_size;
  HostBarrier grid_barrier;
  std::vector<std::unique_ptr<HostBarrier>> block_barriers;
  std::vector<std::vector<unsigned char>> shared;
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
  template <typename T>
  T* shared() const {
    return reinterpret_cast<T*>(g_->shared[block_].data());
  }

 private:
  HostGrid* g_;
  int block_, thread_;
};

// Runs body(env) on grid x threads host threads, like a kernel launch, and waits.
template <class Body>
void host_launch(int grid, int threads, size_t shared_bytes, const Body& body) {
  HostGrid g(grid, threads, shared_bytes);
  std::vector<std::thread> workers;
  workers.reserve(static_cast<size_t>(grid) * threads);
  for (int b = 0; b < grid; ++b)
    for (int t = 0; t < threads; ++t)
      workers.emplace_back([&g, &body, b, t] {
        HostEnv env(&g, b, t);
        body(env);
      });
  for (auto& w : workers) w.join();
}

}  // namespace nnrnn::kern
