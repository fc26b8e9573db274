// Times the GEMMs of a recurrence step (N=512, B=100, T=220, h_{t+1} = h_t W, no nonlinearity) in three
// layouts: one 100-row GEMM (MKL threads itself outside a parallel region), two 50-row slices on two
// OpenMP threads (single-threaded MKL inside), two 256-column halves with a barrier per step.
// Build: g++ -O2 -fopenmp gemm_layouts.cpp -L$TORCH_LIB -ltorch_cpu -lc10 -Wl,-rpath,$TORCH_LIB
// Run with MKL_NUM_THREADS=1 for the one-thread figure of the first layout (output: gemm_layouts.txt).
#include <omp.h>
#include <vector>
#include <random>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <algorithm>
extern "C" void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*, const float*, const int*, const float*, float*, const int*);
// row-major C(M,N) = A(M,K) B(K,N), ldb given
static void gemm(int M, int N, int K, const float* A, int lda, const float* B, int ldb, float* C, int ldc) {
  const float one = 1, zero = 0; const char n = 'N';
  sgemm_(&n, &n, &N, &M, &K, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}
int main(int argc, char** argv) {
  const int N = 512, B = 100, T = 220;
  std::mt19937 g(0); std::normal_distribution<float> d(0, 1.0f / std::sqrt((float)N));
  std::vector<float> W(N * N); for (auto& v : W) v = d(g);
  std::vector<float> H((T + 1) * B * N); for (int i = 0; i < B * N; ++i) H[i] = d(g) * 20;
  auto now = [] { return std::chrono::steady_clock::now(); };
  auto us = [](auto a, auto b) { return std::chrono::duration<double, std::micro>(b - a).count(); };
  for (int rep = 0; rep < 5; ++rep) {
    // (c) one thread, 100 rows
    auto t0 = now();
    for (int t = 0; t < T; ++t) gemm(B, N, N, &H[t * B * N], N, W.data(), N, &H[(t + 1) * B * N], N);
    auto t1 = now();
    // (d) mkl threads
    omp_set_num_threads(2);
    // (a) slices
    auto t2 = now();
    #pragma omp parallel num_threads(2)
    {
      int s = omp_get_thread_num(); int r0 = s * 50;
      for (int t = 0; t < T; ++t) gemm(50, N, N, &H[t * B * N + r0 * N], N, W.data(), N, &H[(t + 1) * B * N + r0 * N], N);
    }
    auto t3 = now();
    // (b) column halves, W half per thread packed contiguous, barrier each step
    std::vector<float> Wh[2];
    for (int s = 0; s < 2; ++s) { Wh[s].resize(N * 256); for (int k = 0; k < N; ++k) std::memcpy(&Wh[s][k * 256], &W[k * N + s * 256], 256 * 4); }
    auto t4 = now();
    #pragma omp parallel num_threads(2)
    {
      int s = omp_get_thread_num();
      for (int t = 0; t < T; ++t) {
        gemm(B, 256, N, &H[t * B * N], N, Wh[s].data(), 256, &H[(t + 1) * B * N + s * 256], N);
        #pragma omp barrier
      }
    }
    auto t5 = now();
    // (e) 4 slices of 25 rows on 2 threads? and (f) column halves with 50-row tiles
    printf("1thr100 %.1f  slices2x50 %.1f  colhalves %.1f us/step\n", us(t0, t1) / T, us(t2, t3) / T, us(t4, t5) / T);
  }
}
