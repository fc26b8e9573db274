// The persistent kernels, instantiated without torch for the static check
// (benchmarks/static_check.py): nvcc -cubin for sm_90 in seconds, then ptxas's
// report and cuobjdump's SASS. The same __global__ templates as the extension
// (csrc/cuda/global_kernels.cuh). The tensor-core kernels take CUDA's __half and
// __nv_bfloat16 for the extension's at::Half and at::BFloat16 (no torch here): the
// same product and exchange; only the inputs' and outputs' conversions are CUDA's own.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

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

#define NNRNN_TC(kind, scalar_t, KT, Problem, ex)                                                         \
  template __global__ void tc_kernel<TcTeamKernel<MmaKind::kind, KT, Problem<scalar_t, float>, ex>>( \
      TcTeamKernel<MmaKind::kind, KT, Problem<scalar_t, float>, ex>, unsigned long long);
#define NNRNN_TCS(kind, scalar_t, KT, ex)         \
  NNRNN_TC(kind, scalar_t, KT, ForwardV2, ex)     \
  NNRNN_TC(kind, scalar_t, KT, BackwardV2, ex)
// bfloat16: every KT and exchange the extension builds; float16 and TF32: the cluster kernels.
NNRNN_TCS(BF16, __nv_bfloat16, 8, Exchange::Block)
NNRNN_TCS(BF16, __nv_bfloat16, 8, Exchange::Cluster)
NNRNN_TCS(BF16, __nv_bfloat16, 8, Exchange::Grid)
NNRNN_TCS(BF16, __nv_bfloat16, 16, Exchange::Block)
NNRNN_TCS(BF16, __nv_bfloat16, 16, Exchange::Cluster)
NNRNN_TCS(BF16, __nv_bfloat16, 16, Exchange::Grid)
NNRNN_TCS(F16, __half, 16, Exchange::Cluster)
NNRNN_TCS(TF32, float, 16, Exchange::Cluster)

}  // namespace nnrnn::kern
