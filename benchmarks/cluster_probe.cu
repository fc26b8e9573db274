// How many thread-block clusters of each size can be resident at once on device 0
// (cudaOccupancyMaxActiveClusters), for a kernel of THREADS threads per block and
// each given amount of dynamic shared memory per block: one JSON line per case.
// Run by benchmarks/gpu_check.sh's environment phase (gpu_phases.probe_clusters).
//
//   cluster_probe THREADS SHARED_BYTES...
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>

__global__ void probe_kernel() {
  extern __shared__ char shared[];
  if (threadIdx.x == 0 && blockIdx.x == 0xffffffffu) shared[0] = 0;  // never true: uses the shared memory
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: cluster_probe THREADS SHARED_BYTES...\n");
    return 2;
  }
  const int threads = std::atoi(argv[1]);
  cudaError_t err = cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
  if (err == cudaSuccess) {
    int optin = 0;
    err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, 0);
    if (err == cudaSuccess) err = cudaFuncSetAttribute(probe_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  }
  if (err != cudaSuccess) {
    std::fprintf(stderr, "cluster_probe: %s\n", cudaGetErrorString(err));
    return 1;
  }
  for (int i = 2; i < argc; ++i) {
    const int bytes = std::atoi(argv[i]);
    for (int cluster = 1; cluster <= 16; cluster *= 2) {
      cudaLaunchAttribute attr;
      attr.id = cudaLaunchAttributeClusterDimension;
      attr.val.clusterDim.x = cluster;
      attr.val.clusterDim.y = 1;
      attr.val.clusterDim.z = 1;
      cudaLaunchConfig_t config = {};
      config.gridDim = dim3(cluster);
      config.blockDim = dim3(threads);
      config.dynamicSmemBytes = bytes;
      config.attrs = &attr;
      config.numAttrs = 1;
      int count = 0;
      const cudaError_t e = cudaOccupancyMaxActiveClusters(&count, probe_kernel, &config);
      std::printf("{\"cluster\": %d, \"threads\": %d, \"shared_bytes\": %d, \"max_active_clusters\": %d%s%s%s}\n",
                  cluster, threads, bytes, count, e == cudaSuccess ? "" : ", \"error\": \"",
                  e == cudaSuccess ? "" : cudaGetErrorString(e), e == cudaSuccess ? "" : "\"");
      (void)cudaGetLastError();
    }
  }
  return 0;
}
