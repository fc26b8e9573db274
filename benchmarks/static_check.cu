// The persistent kernels, instantiated without torch for the static check
// (benchmarks/static_check.py): nvcc -cubin for sm_90 in seconds, then ptxas's
// report and cuobjdump's SASS. The same __global__ templates as the extension
// (csrc/cuda/global_kernels.cuh).
#include "../csrc/cuda/global_kernels.cuh"

namespace nnrnn::kern {

template __global__ void persistent_kernel<PersistentForward<float, float>>(PersistentForward<float, float>,
                                                                           unsigned long long);
template __global__ void persistent_kernel<PersistentBackward<float, float>>(PersistentBackward<float, float>,
                                                                            unsigned long long);
#define NNRNN_TEAM(scalar_t, Problem, ex)                                                                    \
  template __global__ void team_kernel<TeamKernel<DeviceTileShape<scalar_t>, Problem<scalar_t, scalar_t>, ex>>( \
      TeamKernel<DeviceTileShape<scalar_t>, Problem<scalar_t, scalar_t>, ex>, unsigned long long);
#define NNRNN_TEAMS(scalar_t, ex)          \
  NNRNN_TEAM(scalar_t, ForwardV2, ex)      \
  NNRNN_TEAM(scalar_t, BackwardV2, ex)
NNRNN_TEAMS(float, Exchange::Block)
NNRNN_TEAMS(float, Exchange::Cluster)
NNRNN_TEAMS(float, Exchange::Grid)
NNRNN_TEAMS(double, Exchange::Block)
NNRNN_TEAMS(double, Exchange::Cluster)
NNRNN_TEAMS(double, Exchange::Grid)

}  // namespace nnrnn::kern
