// The cache of big CPU blocks behind empty_from_cache (see block_cache.h), and
// the ops nnrnn_fused::cpu_cache_info and nnrnn_fused::empty_cpu_cache.
#include "block_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sys/mman.h>
#endif

namespace nnrnn::cpu {
namespace {

constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr size_t kHugePage = size_t(2) << 20;

// NNRNN_CPU_CACHE_MB, read at every call: the most bytes kept while unused
// (unset: 1024 MiB). nullopt where it is not a whole number of MiB from 0 to 2^30.
std::optional<size_t> cap_from_env() {
  const char* env = std::getenv("NNRNN_CPU_CACHE_MB");
  if (!env || !*env) return size_t(1024) << 20;
  const std::string text(env);
  const bool digits = text.size() <= 10 && text.find_first_not_of("0123456789") == std::string::npos;
  const long long mb = digits ? std::stoll(text) : -1;
  if (mb < 0 || mb > (1LL << 30)) return std::nullopt;
  return static_cast<size_t>(mb) << 20;
}

// The cap where an error can be raised (allocating); a freed block with a
// malformed variable is simply freed.
size_t cap_bytes() {
  const auto cap = cap_from_env();
  TORCH_CHECK_VALUE(cap, "NNRNN_CPU_CACHE_MB must be a whole number of MiB (0: no cache) or unset, got '",
                    std::getenv("NNRNN_CPU_CACHE_MB"), "'");
  return *cap;
}

// Four classes per power of two, in whole 2 MiB pages: a freed block serves the
// next request of any size in its class.
size_t size_class(size_t n) {
  size_t top = 1;
  while (top <= n / 2) top *= 2;
  const size_t step = std::max(top / 4, kHugePage);
  return (n + step - 1) / step * step;
}

// Fresh memory, asked for in huge pages where Linux has them on request
// (transparent huge pages in "madvise" mode): the first use then faults 2 MiB at
// a time. nullptr when the system has none to give.
void* fresh_block(size_t bytes) {
#if defined(__linux__)
  void* p = nullptr;
  if (posix_memalign(&p, kHugePage, bytes) != 0) return nullptr;
  madvise(p, bytes, MADV_HUGEPAGE);  // advice only: failure changes nothing
  return p;
#else
  try {
    return c10::alloc_cpu(bytes);
  } catch (const c10::Error&) {
    return nullptr;
  }
#endif
}

void free_block(void* p) {
#if defined(__linux__)
  std::free(p);
#else
  c10::free_cpu(p);
#endif
}

struct Cache {
  std::mutex mutex;
  std::deque<std::pair<size_t, void*>> unused;  // (bytes, block), oldest first
  std::unordered_map<void*, size_t> bytes_of;   // every block handed out or kept
  size_t unused_bytes = 0;
  size_t live_bytes = 0;  // in blocks handed out and not given back
  int64_t hits = 0, misses = 0;
};

// torch.profiler(profile_memory=True) counts CPU memory through these reports,
// as torch's own CPU allocator makes them; the caller holds the lock.
void report_locked(const Cache& c, void* block, int64_t delta) {
  c10::reportMemoryUsageToProfiler(block, delta, c.live_bytes, c.live_bytes + c.unused_bytes,
                                   c10::Device(c10::kCPU));
}

// Never destroyed: a tensor may free its block after static destructors ran.
Cache& cache() {
  static Cache* c = [] {
    auto* made = new Cache;
#if defined(__linux__)
    // A child forked while another thread held the lock (a DataLoader worker) would
    // wait for it forever: the child starts with a fresh one. The blocks it inherits
    // are its own copies.
    pthread_atfork(nullptr, nullptr, [] { new (&cache().mutex) std::mutex; });
#endif
    return made;
  }();
  return *c;
}

// Frees the oldest unused blocks until at most `cap` bytes stay; the caller holds
// the lock and frees the returned blocks after releasing it.
std::vector<void*> trim_locked(Cache& c, size_t cap) {
  std::vector<void*> freed;
  while (c.unused_bytes > cap && !c.unused.empty()) {
    auto [bytes, block] = c.unused.front();
    c.unused.pop_front();
    c.unused_bytes -= bytes;
    c.bytes_of.erase(block);
    freed.push_back(block);
  }
  return freed;
}

void give_back(void* block) {
  Cache& c = cache();
  std::vector<void*> freed;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    const size_t bytes = c.bytes_of.at(block);
    c.unused.emplace_back(bytes, block);
    c.unused_bytes += bytes;
    c.live_bytes -= bytes;
    freed = trim_locked(c, cap_from_env().value_or(0));
    report_locked(c, block, -static_cast<int64_t>(bytes));
  }
  for (void* p : freed) free_block(p);
}

void empty_cpu_cache() {
  Cache& c = cache();
  std::vector<void*> freed;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    freed = trim_locked(c, 0);
  }
  for (void* p : freed) free_block(p);
}

class CachingAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes || cap_bytes() == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t bytes = size_class(n);
    Cache& c = cache();
    {
      std::lock_guard<std::mutex> lock(c.mutex);
      for (auto it = c.unused.rbegin(); it != c.unused.rend(); ++it) {  // newest first: warmest in cache
        if (it->first != bytes) continue;
        void* block = it->second;
        c.unused.erase(std::next(it).base());
        c.unused_bytes -= bytes;
        c.live_bytes += bytes;
        ++c.hits;
        report_locked(c, block, static_cast<int64_t>(bytes));
        return {block, block, &give_back, c10::Device(c10::kCPU)};
      }
      ++c.misses;
    }
    void* block = fresh_block(bytes);
    if (!block) {  // the unused blocks of other sizes may be what the system lacks
      empty_cpu_cache();
      block = fresh_block(bytes);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, block, "fused_nnrnn: out of CPU memory allocating ", bytes,
                     " bytes for an output (after freeing the unused blocks of its cache)");
    {
      std::lock_guard<std::mutex> lock(c.mutex);
      c.bytes_of.emplace(block, bytes);
      c.live_bytes += bytes;
      report_locked(c, block, static_cast<int64_t>(bytes));
    }
    return {block, block, &give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

CachingAllocator& caching_allocator() {
  static CachingAllocator* a = new CachingAllocator;
  return *a;
}

// [bytes kept unused, blocks kept unused, requests served from the cache, requests that were not]
std::vector<int64_t> cpu_cache_info() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return {static_cast<int64_t>(c.unused_bytes), static_cast<int64_t>(c.unused.size()), c.hits, c.misses};
}

}  // namespace

at::Tensor empty_from_cache(at::IntArrayRef sizes, c10::ScalarType dtype) {
  return at::detail::empty_generic(sizes, &caching_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

TORCH_LIBRARY_FRAGMENT(nnrnn_fused, m) {
  m.def("cpu_cache_info() -> int[]", &cpu_cache_info);
  m.def("empty_cpu_cache() -> ()", &empty_cpu_cache);
}

}  // namespace nnrnn::cpu
