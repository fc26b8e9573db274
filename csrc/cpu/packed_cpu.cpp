// The packed CPU path: per-ISA instantiation of the workers (packed_kernels.h),
// the runtime choice of ISA and of path, and the op nnrnn_fused::cpu_path.
#include "packed.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#if defined(__GNUC__)  // GCC and Clang: vector extensions and target attributes
#define NNRNN_PACKED 1
#include "packed_kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#define NNRNN_PACKED_X86 1
#endif
#endif

namespace nnrnn::cpu {
namespace {

std::string env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? std::string() : std::string(v);
}

// Where the packed path beat one BLAS GEMM per step: `--grid crossover` (float32,
// T=100, N 32..1024, B 1..256, forward and forward+backward), both paths with batch
// slices, 3 passes with 2 threads and 2 with 1, on two 2-core machines. The packed path
// is taken for N <= max_N when min_B <= B <= max_B, the BLAS path otherwise. BLAS is
// torch's, MKL on x86, and how fast it is depends on the vendor of the CPU, so there is
// one table per vendor (NNRNN_CPU_CROSSOVER=intel|amd picks one; other CPUs get Intel's).
// - Intel Xeon with AVX-512 (benchmarks/results/cpu_v2/blas_slices_crossover_*; the tables
//   before came from slices_crossover_* and crossover_*). Forward+backward, packed against
//   BLAS: N <= 128 1.0x to 1.7x faster (N=32 B=256 on two threads 0.94x, within the noise:
//   0.74x to 1.32x over the passes); N=256 0.85x to 1.05x (since the BLAS path slices its
//   batch too, it wins or ties there: before, packed won 1.0x to 1.5x at B 2 to 100);
//   N=512 and 1024 0.60x to 0.97x.
// - AMD EPYC Zen 4 with AVX-512 (benchmarks/results/cpu_v2/amd_crossover_*): the packed
//   path won everywhere, forward 1.04x to 3.05x, forward+backward 1.07x to 1.82x at most
//   shapes; the exceptions were within the noise (N=64 B=1 two threads 0.92x, 0.92x-1.27x
//   over the passes; N=1024 B=32 two threads 0.78x, 0.76x-1.36x; N=512 B=256 and N=1024 B=1
//   one thread 0.99x and 0.96x). MKL's GEMMs run well below their speed on Intel there.
struct Crossover {
  int64_t max_N, min_B, max_B;
};
constexpr int64_t kAnyB = std::numeric_limits<int64_t>::max();

// Beyond this the packed copies of W, W^T and dW (3 N^2 elements) are no longer small.
constexpr int64_t kMaxPackedN = 4096;

struct CrossoverTable {
  const char* vendor;
  std::vector<Crossover> rows;
};

const CrossoverTable& crossover_table() {
  static const CrossoverTable intel{"Intel", {{128, 1, kAnyB}}};
  static const CrossoverTable amd{"AMD", {{kMaxPackedN, 1, kAnyB}}};
  const std::string forced = env("NNRNN_CPU_CROSSOVER");
  TORCH_CHECK_VALUE(forced.empty() || forced == "intel" || forced == "amd",
                    "NNRNN_CPU_CROSSOVER must be intel or amd (or unset), got '", forced, "'");
  if (!forced.empty()) return forced == "amd" ? amd : intel;
#if NNRNN_PACKED_X86
  static const bool is_amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return is_amd ? amd : intel;
#else
  return intel;
#endif
}

// Batch slices. Rows of the batch never exchange anything, so slices of rows run
// their whole time loops on threads of their own with no barrier at all; a team
// that splits each step's columns over threads meets at a barrier every step and
// reads the other threads' columns of h_{t-1} from their caches. Measured on the
// 2-core machine (forward, float32, T=220, two threads): split by columns, N=128
// B=10 ran 3.4 µs/step, as fast as one thread; split into two slices, 2.1 µs/step
// (N=128 B=100: 25 and 14.6). One slice per thread, each of at least
// kMinSliceRows rows (a tile of fewer rows has too few independent FMA chains);
// more slices than threads were slower (each re-reads W every step: N=128 B=100,
// 8 slices on 2 threads ran the forward at 34 µs/step). dW and db are summed slice
// by slice, so their last bits depend on the slice count, hence on the number of
// threads; everything else does not. NNRNN_CPU_SLICES=<n> (tests, measurements)
// sets the count; 1 gives the column team.
//
// The BLAS path slices the batch the same way (recurrence_cpu.cpp): each thread
// runs single-threaded GEMMs on its rows and the nonlinearity while they are in
// its cache, instead of every step's GEMM and pointwise pass each forking over
// both threads and reading the other core's rows. Each thread then reads all of W
// every step, so only while W fits in a core's L2 with room to spare (2 MB here).
// Forward / backward µs/step, 2 threads, float32, modReLU, T=100, one slice against
// two (two runs each, a noisy hour): N=512 B=100 395-407 / 747-788 against 318-371 /
// 579-647; B=32 129 / 251-256 against 109-111 / 184-190; B=10 40-48 / 73 against
// 34-38 / 62-65; N=256 B=256 236-278 / 524-540 against 177-186 / 366-370. N=768
// (W 2.25 MB) at B=10 and 32 and N=1024 at B=10 to 32 were 1.2x to 1.8x slower
// sliced; float64 N=512 (2 MB) about even.
constexpr int64_t kMinSliceRows = 5;
constexpr int64_t kMaxSlicedBlasWBytes = int64_t(1) << 20;

int64_t slice_count(int64_t B, bool worth_slicing) {
  const std::string forced = env("NNRNN_CPU_SLICES");
  if (!forced.empty()) {
    const int64_t n = std::atoll(forced.c_str());
    TORCH_CHECK_VALUE(n >= 1 && std::to_string(n) == forced,
                      "NNRNN_CPU_SLICES must be a positive integer (or unset), got '", forced, "'");
    return std::max<int64_t>(1, std::min(n, B));
  }
  if (!worth_slicing) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kMinSliceRows));
}

std::string slices_text(int64_t slices) {
  return std::to_string(slices) + (slices == 1 ? " batch slice" : " batch slices");
}

CpuPath blas_path(int64_t N, int64_t B, c10::ScalarType dtype, const std::string& why) {
  const int64_t W_bytes = N * N * static_cast<int64_t>(c10::elementSize(dtype));
  const int64_t slices = slice_count(B, W_bytes <= kMaxSlicedBlasWBytes);
  return {false, slices, "blas: " + why + ", " + slices_text(slices)};
}

#if NNRNN_PACKED
enum class Level { Generic, Avx2, Avx512 };

// One instantiation of the workers per ISA, in functions that carry the ISA's
// target attribute and inline (flatten) the whole time loop.
#define NNRNN_PACKED_ISA(name, attributes, vec_bytes, max_rows)                                   \
  template <typename T>                                                                          \
  using name##_isa = packed::Isa<T, vec_bytes, max_rows>;                                        \
  template <typename T>                                                                          \
  attributes void forward_##name(const packed::ForwardArgs<T>& a, Team& team) {            \
    packed::forward_worker<name##_isa<T>>(a, team);                                              \
  }                                                                                              \
  template <typename T>                                                                          \
  attributes void backward_##name(const packed::BackwardArgs<T>& a, Team& team) {          \
    packed::backward_worker<name##_isa<T>>(a, team);                                             \
  }

// Registers: AVX-512 has 32 vector registers (8 x 2 accumulators), AVX2 and SSE2 16
// (6 x 2 and 4 x 2); NEON has 32 but gets the SSE2 tile.
NNRNN_PACKED_ISA(generic, __attribute__((flatten)), 16, 4)
#if NNRNN_PACKED_X86
NNRNN_PACKED_ISA(avx2, __attribute__((flatten, target("avx2,fma"))), 32, 6)
NNRNN_PACKED_ISA(avx512, __attribute__((flatten, target("avx512f,fma"))), 64, 8)
#endif

template <typename T>
struct Kernels {
  void (*forward)(const packed::ForwardArgs<T>&, Team&);
  void (*backward)(const packed::BackwardArgs<T>&, Team&);
  int64_t cols;  // panel width
  const char* name;
};

Level best_level() {
#if NNRNN_PACKED_X86
  static const Level best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return Level::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Level::Avx2;
    return Level::Generic;
  }();
  return best;
#else
  return Level::Generic;
#endif
}

// The best level of this CPU, capped by NNRNN_CPU_ISA.
Level chosen_level() {
  const std::string cap = env("NNRNN_CPU_ISA");
  Level wanted = Level::Avx512;
  if (cap == "avx2") {
    wanted = Level::Avx2;
  } else if (cap == "generic") {
    wanted = Level::Generic;
  } else {
    TORCH_CHECK_VALUE(cap.empty() || cap == "avx512",
                      "NNRNN_CPU_ISA must be avx512, avx2 or generic (or unset), got '", cap, "'");
  }
  return std::min(best_level(), wanted);
}

template <typename T>
Kernels<T> kernels(Level level) {
#if NNRNN_PACKED_X86
  if (level == Level::Avx512) return {forward_avx512<T>, backward_avx512<T>, avx512_isa<T>::kCols, "avx512"};
  if (level == Level::Avx2) return {forward_avx2<T>, backward_avx2<T>, avx2_isa<T>::kCols, "avx2"};
#endif
  return {forward_generic<T>, backward_generic<T>, generic_isa<T>::kCols, "generic"};
}

// As many threads as torch uses, at most one per panel.
int team_size(int64_t N, int64_t cols) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), packed::panel_count(N, cols));
  return static_cast<int>(std::max<int64_t>(1, threads));
}

// Consecutive calls that ran solo: a team that went solo (team.h) says the
// machine is busy, so the next calls start solo, and every kProbeEvery-th call
// tries a team again. Which thread computes a column never changes its bits.
std::atomic<unsigned> solo_calls{0};
constexpr unsigned kProbeEvery = 8;

// NNRNN_CPU_TEAM=fixed (tests, measurements): the team keeps its size.
template <class Body>
void run_adaptive_team(int wanted, const Body& body) {
  const std::string team = env("NNRNN_CPU_TEAM");
  TORCH_CHECK_VALUE(team.empty() || team == "adaptive" || team == "fixed",
                    "NNRNN_CPU_TEAM must be adaptive or fixed (or unset), got '", team, "'");
  if (team == "fixed") {
    run_team(wanted, false, body);
    return;
  }
  const unsigned streak = solo_calls.load(std::memory_order_relaxed);
  if (wanted > 1 && streak % kProbeEvery != 0) {
    run_team(1, false, body);
    solo_calls.store(streak + 1, std::memory_order_relaxed);
    return;
  }
  const bool solo = run_team(wanted, true, body);
  if (wanted > 1) solo_calls.store(solo ? streak + 1 : 0, std::memory_order_relaxed);
}

// Threads that run `slices` slices, or a team on one slice's panels.
int thread_count(int64_t N, int64_t cols, int64_t slices) {
  if (slices == 1) return team_size(N, cols);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), slices)));
}

int slow_member_us() {
  const std::string v = env("NNRNN_CPU_SLOW_MEMBER_US");  // tests: a member descheduled at every step
  return v.empty() ? 0 : std::max(0, std::atoi(v.c_str()));
}

// Rows by decreasing length (stable), and how many are still running at each step.
struct RowOrder {
  std::vector<int64_t> order, active;
};
RowOrder row_order(int64_t steps, int64_t B, const std::vector<int64_t>& lengths) {
  RowOrder r{std::vector<int64_t>(B), std::vector<int64_t>(steps, B)};
  std::iota(r.order.begin(), r.order.end(), 0);
  if (lengths.empty()) return r;
  std::stable_sort(r.order.begin(), r.order.end(), [&](int64_t a, int64_t b) { return lengths[a] > lengths[b]; });
  int64_t running = B;
  for (int64_t t = 0; t < steps; ++t) {
    while (running > 0 && lengths[r.order[running - 1]] <= t) --running;
    r.active[t] = running;
  }
  return r;
}

// The rows of each slice, in the length order, and how many run at each step.
// With lengths, slice s of S takes the rows at positions s, s + S, ... of the
// length order, so that the slices get sequences of similar lengths. Without, every
// split is balanced and slice s takes a block of consecutive rows: a thread's rows
// then do not sit between the other thread's in memory (measured at N=128 B=10,
// two threads: forward 12-15% faster than every other row; backward the same).
std::vector<RowOrder> split_rows(const RowOrder& all, int64_t slices, bool with_lengths) {
  const int64_t B = static_cast<int64_t>(all.order.size());
  std::vector<RowOrder> parts(slices);
  for (int64_t s = 0; s < slices; ++s) {
    if (with_lengths) {
      for (int64_t i = s; i < B; i += slices) parts[s].order.push_back(all.order[i]);
      for (int64_t running : all.active) {
        parts[s].active.push_back(running > s ? (running - s + slices - 1) / slices : 0);
      }
    } else {
      const int64_t first = B * s / slices, last = B * (s + 1) / slices;
      parts[s].order.assign(all.order.begin() + first, all.order.begin() + last);
      parts[s].active.assign(all.active.size(), last - first);
    }
  }
  return parts;
}

// Runs body(slice, team) for every slice: a team over the columns for a single
// slice, else the slices spread over the threads, each with a team of one.
template <class Body>
void run_slices(int64_t slices, int threads, const Body& body) {
  if (slices == 1) {
    run_adaptive_team(threads, [&](Team& team) { body(0, team); });
    return;
  }
  at::parallel_for(0, slices, (slices + threads - 1) / threads, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      TeamShared shared;
      Team team(0, 1, &shared);
      body(s, team);
    }
  });
}

template <typename T>
at::Tensor scratch(int64_t elements) {  // 64-byte aligned (c10's CPU allocator)
  return at::empty({elements}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}
#endif  // NNRNN_PACKED

}  // namespace

CpuPath choose_cpu_path(int64_t N, int64_t B, c10::ScalarType dtype) {
  const std::string forced = env("NNRNN_CPU_KERNEL");
  TORCH_CHECK_VALUE(forced.empty() || forced == "auto" || forced == "packed" || forced == "blas",
                    "NNRNN_CPU_KERNEL must be auto, packed or blas (or unset), got '", forced, "'");
#if NNRNN_PACKED
  if (forced == "blas") return blas_path(N, B, dtype, "forced by NNRNN_CPU_KERNEL=blas");
  if (N == 0 || B == 0) return blas_path(N, B, dtype, "empty (N or B is 0)");
  if (N > kMaxPackedN) return blas_path(N, B, dtype, "N > " + std::to_string(kMaxPackedN));
  if (forced != "packed") {
    const CrossoverTable& table = crossover_table();
    const auto row = std::find_if(table.rows.begin(), table.rows.end(),
                                  [&](const Crossover& c) { return N <= c.max_N; });
    if (row == table.rows.end() || B < row->min_B || B > row->max_B) {
      const std::string why = std::string("faster for this shape (crossover table of ") + table.vendor + " CPUs)";
      return blas_path(N, B, dtype, why);
    }
  }
  const Level level = chosen_level();
  const int64_t cols = dtype == at::kDouble ? kernels<double>(level).cols : kernels<float>(level).cols;
  const int64_t slices = slice_count(B, true);
  const int threads = thread_count(N, cols, slices);
  return {true, slices,
          std::string("packed: ") + kernels<float>(level).name + ", " + slices_text(slices) + ", " +
              std::to_string(threads) + (threads == 1 ? " thread" : " threads")};
#else
  return blas_path(N, B, dtype, "the packed kernels need GCC or Clang");
#endif
}

#define NNRNN_INSTANTIATE(T)                                                                                  \
  template void packed_forward<T>(int64_t, int64_t, int64_t, int64_t, const T*, StridedMatrix<T>, const T*,     \
                                  const T*, const std::vector<int64_t>&, Nonlinearity, T*);                    \
  template void packed_backward<T>(int64_t, int64_t, int64_t, int64_t, StridedMatrix<T>, const T*, const T*,    \
                                   const T*, const T*, const std::vector<int64_t>&, Nonlinearity, T*, T*,       \
                                   double*, T*);

#if NNRNN_PACKED
template <typename T>
void packed_forward(int64_t steps, int64_t B, int64_t N, int64_t slices, const T* x, StridedMatrix<T> W,
                    const T* bias, const T* h0, const std::vector<int64_t>& lengths, Nonlinearity f, T* out) {
  if (steps == 0) return;
  const Kernels<T> k = kernels<T>(chosen_level());
  const int64_t panels = packed::panel_count(N, k.cols);
  auto packed_W = scratch<T>(panels * N * k.cols);
  T* pw = packed_W.template data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    packed::pack_panels(W.data, W.row_stride, W.col_stride, N, N, k.cols, p0, p1, pw);  // W (k, j) -> panels of j
  });
  const std::vector<RowOrder> parts = split_rows(row_order(steps, B, lengths), slices, !lengths.empty());
  const int slow_us = slices == 1 ? slow_member_us() : 0;
  run_slices(slices, thread_count(N, k.cols, slices), [&](int64_t s, Team& team) {
    const RowOrder& rows = parts[s];
    const packed::ForwardArgs<T> args{steps, B, N, static_cast<int64_t>(rows.order.size()), x, bias, h0, out,
                                      rows.order.data(), rows.active.data(), f, pw, slow_us};
    k.forward(args, team);
  });
}

template <typename T>
void packed_backward(int64_t steps, int64_t B, int64_t N, int64_t slices, StridedMatrix<T> W, const T* out,
                     const T* grad_out, const T* grad_h_n, const T* h0, const std::vector<int64_t>& lengths,
                     Nonlinearity f, T* dx, T* dW, double* db, T* grad_h0) {
  const Kernels<T> k = kernels<T>(chosen_level());
  const int64_t panels = packed::panel_count(N, k.cols), panel_size = N * k.cols;
  auto packed_Wt = scratch<T>(panels * panel_size);
  T* pwt = packed_Wt.template data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    packed::pack_panels(W.data, W.col_stride, W.row_stride, N, N, k.cols, p0, p1, pwt);  // W^T (j, k) -> panels of k
  });
  // Per slice: its dW panels, its db, and the da of its last kDwSteps steps per panel
  // (the rows of the slices add up to B).
  auto packed_dW = scratch<T>(slices * panels * panel_size);
  auto packed_d = scratch<T>(panels * packed::kDwSteps * B * k.cols);
  auto slice_db = at::empty({slices, N}, at::kDouble);
  std::vector<const T*> dW_parts(slices);
  std::vector<const double*> db_parts(slices);
  const std::vector<RowOrder> parts = split_rows(row_order(steps, B, lengths), slices, !lengths.empty());
  const int slow_us = slices == 1 ? slow_member_us() : 0;
  std::vector<packed::BackwardArgs<T>> args;
  for (int64_t s = 0, rows_before = 0; s < slices; ++s) {
    const RowOrder& rows = parts[s];
    const int64_t count = static_cast<int64_t>(rows.order.size());
    T* slice_dW = packed_dW.template data_ptr<T>() + s * panels * panel_size;
    double* db_s = slice_db.template data_ptr<double>() + s * N;
    T* slice_d = packed_d.template data_ptr<T>() + panels * packed::kDwSteps * rows_before * k.cols;
    args.push_back({steps, B, N, count, out, grad_out, grad_h_n, h0, rows.order.data(), rows.active.data(), f, dx,
                    grad_h0, db_s, pwt, slice_dW, slice_d, slow_us});
    dW_parts[s] = slice_dW;
    db_parts[s] = db_s;
    rows_before += count;
  }
  run_slices(slices, thread_count(N, k.cols, slices), [&](int64_t s, Team& team) { k.backward(args[s], team); });
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    packed::sum_slices(N, k.cols, slices, dW_parts.data(), db_parts.data(), p0, p1, dW, db);
  });
}

#else  // choose_cpu_path never picks the packed path here
template <typename T>
void packed_forward(int64_t, int64_t, int64_t, int64_t, const T*, StridedMatrix<T>, const T*, const T*,
                    const std::vector<int64_t>&, Nonlinearity, T*) {
  TORCH_INTERNAL_ASSERT(false, "the packed CPU kernels are not built");
}
template <typename T>
void packed_backward(int64_t, int64_t, int64_t, int64_t, StridedMatrix<T>, const T*, const T*, const T*, const T*,
                     const std::vector<int64_t>&, Nonlinearity, T*, T*, double*, T*) {
  TORCH_INTERNAL_ASSERT(false, "the packed CPU kernels are not built");
}
#endif  // NNRNN_PACKED
NNRNN_INSTANTIATE(float)
NNRNN_INSTANTIATE(double)

namespace {
std::string cpu_path(int64_t N, int64_t B, c10::ScalarType dtype) {
  TORCH_CHECK_VALUE(N >= 0 && B >= 0, "cpu_path: N and B must be >= 0, got N = ", N, ", B = ", B);
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kDouble, "cpu_path: unsupported dtype ", dtype,
                    "; supported on the CPU: float32, float64");
  return choose_cpu_path(N, B, dtype).description;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(nnrnn_fused, m) {
  m.def("cpu_path(int N, int B, ScalarType dtype) -> str", &cpu_path);
}

}  // namespace nnrnn::cpu
