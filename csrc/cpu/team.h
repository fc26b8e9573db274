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
#include <cstdint>
#include <limits>
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

// What the members of one team share.
struct TeamShared {
  bool may_go_solo = true;
  SpinBarrier barrier;
  // The barrier count after which the team goes solo (member 0 alone); set at most once.
  std::atomic<int64_t> solo_after{std::numeric_limits<int64_t>::max()};
};

// One member's view of its team. A member measures how long it works and how long
// it waits at the barrier; when waiting makes the team slower than member 0 alone
// would be (a busy machine: a member descheduled for a time slice stalls every
// step), the team goes solo: member 0 takes every share and the others leave.
// Which member computes a column never changes its bits, so the switch does not
// change the results. The switch is agreed at a barrier: a member proposes it
// between barriers k and k + 1 (solo_after = k + 1); every member reads it after
// passing barrier k + 1, and one more barrier makes the leavers' writes visible.
class Team {
 public:
  Team(int member, int members, TeamShared* shared)
      : member_(member), members_(members), shared_(shared), since_(Clock::now()) {}

  int member() const { return member_; }
  int members() const { return members_; }

  // This member's part of the step is written. Returns the round to pass to wait().
  unsigned arrive() { return members_ > 1 ? shared_->barrier.arrive(members_) : 0; }

  // Waits for the others' parts. share: the fraction of the work this member had.
  // Returns false when this member leaves (the team went solo); member 0 then has
  // members() == 1 and takes every share from the next step.
  bool wait(unsigned round, double share) {
    if (members_ == 1) return true;
    const Clock::time_point start = Clock::now();
    shared_->barrier.wait(round);
    const Clock::time_point end = Clock::now();
    worked_ += start - since_;
    waited_ += end - start;
    since_ = end;
    if (shared_->solo_after.load(std::memory_order_acquire) <= ++passed_) {
      shared_->barrier.arrive_and_wait(members_);
      members_ = 1;
      return member_ == 0;
    }
    // Solo costs about worked / share; the team costs worked + waited. Propose it
    // only when it is clearly faster, over enough steps to judge.
    if (shared_->may_go_solo && passed_ >= kMinStepsBeforeSolo && (worked_ + waited_) * share > kSoloMargin * worked_) {
      int64_t never = std::numeric_limits<int64_t>::max();
      shared_->solo_after.compare_exchange_strong(never, passed_ + 1, std::memory_order_acq_rel);
    }
    return true;
  }

  bool sync(double share) { return wait(arrive(), share); }

 private:
  using Clock = std::chrono::steady_clock;
  static constexpr int64_t kMinStepsBeforeSolo = 4;
  static constexpr double kSoloMargin = 1.5;
  int member_, members_;
  TeamShared* shared_;
  Clock::time_point since_;  // the end of the last wait (or the start)
  Clock::duration worked_{}, waited_{};
  int64_t passed_ = 0;  // barriers passed
};

// Runs body(team) on min(wanted, OpenMP's team size) threads and returns when all
// are done; true when the team went solo. body must not throw: a member that left
// early would leave the others waiting at the barrier.
template <class Body>
bool run_team(int wanted, bool may_go_solo, const Body& body) {
  TeamShared shared;
  shared.may_go_solo = may_go_solo;
#if defined(_OPENMP)
  if (wanted > 1) {
    // No num_threads clause, as in ATen's parallel_for: the pool keeps its size.
#pragma omp parallel
    {
      const int members = std::min(wanted, omp_get_num_threads());
      const int member = omp_get_thread_num();
      if (member < members) {
        Team team(member, members, &shared);
        body(team);
      }
    }
    return shared.solo_after.load() != std::numeric_limits<int64_t>::max();
  }
#endif
  Team team(0, 1, &shared);
  body(team);
  return false;
}

}  // namespace nnrnn::cpu
