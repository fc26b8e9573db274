// A team of CPU threads that stays together for a whole sequence and meets at a
// barrier once per step: the CPU counterpart of the GPU's persistent kernel.
//
// The threads are the OpenMP pool's that torch's own ops use (the extension is
// built with -fopenmp and shares torch's libgomp): no thread is created per call,
// and no pool thread is left spinning on a core that the team needs. The members
// of an OpenMP team are real threads that all run, so waiting for one another at a
// barrier is safe; the team is as large as OpenMP makes it (torch.set_num_threads,
// one thread inside another parallel region), and the work is split over the
// threads actually present. Without OpenMP the team is the calling thread alone.
//
// The barrier spins with a bounded back-off, then yields, then sleeps: a member
// descheduled by the OS (a busy machine) delays the others but never deadlocks
// them, and they do not hold a core while they wait long.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>

#if defined(_OPENMP)
#include <omp.h>
#endif

namespace nnrnn::cpu {

inline void cpu_relax() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_ia32_pause();
#elif defined(__GNUC__) && defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Waiting: short spins that double up to 64 pauses, then yields, then 50 µs sleeps.
class Backoff {
 public:
  void pause() {
    if (rounds_ < kSpinRounds) {
      for (int i = 0, n = 1 << std::min(rounds_, 6); i < n; ++i) cpu_relax();
    } else if (rounds_ < kSpinRounds + kYieldRounds) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    if (rounds_ < kSpinRounds + kYieldRounds) ++rounds_;
  }

 private:
  static constexpr int kSpinRounds = 64;  // about 3,800 pauses: tens of microseconds
  static constexpr int kYieldRounds = 100;
  int rounds_ = 0;
};

// A reusable barrier. arrive() and wait() are separate so that a thread can do
// work that the others do not wait for (the weight gradient's update) between
// announcing that its part of a step is written and waiting for theirs.
class SpinBarrier {
 public:
  // Returns the round to pass to wait().
  unsigned arrive(int members) {
    const unsigned round = round_.load(std::memory_order_relaxed);
    // acq_rel: the last to arrive sees every member's writes before it opens the round.
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == members - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      round_.store(round + 1, std::memory_order_release);
    }
    return round;
  }
  void wait(unsigned round) const {
    Backoff backoff;
    while (round_.load(std::memory_order_acquire) == round) backoff.pause();
  }
  void arrive_and_wait(int members) { wait(arrive(members)); }

 private:
  std::atomic<int> arrived_{0};
  std::atomic<unsigned> round_{0};
};

struct Team {
  int member, members;
  SpinBarrier* barrier;
  void sync() const {
    if (members > 1) barrier->arrive_and_wait(members);
  }
};

// Runs body(team) on min(wanted, OpenMP's team size) threads and returns when all
// are done. body must not throw: a member that left early would leave the others
// waiting at the barrier.
template <class Body>
void run_team(int wanted, const Body& body) {
  SpinBarrier barrier;
#if defined(_OPENMP)
  if (wanted > 1) {
    // No num_threads clause, as in ATen's parallel_for: the pool keeps its size.
#pragma omp parallel
    {
      const int members = std::min(wanted, omp_get_num_threads());
      const int member = omp_get_thread_num();
      if (member < members) body(Team{member, members, &barrier});
    }
    return;
  }
#endif
  body(Team{0, 1, &barrier});
}

}  // namespace nnrnn::cpu
