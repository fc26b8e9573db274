// Which path the CUDA recurrence takes (defined in recurrence_cuda.cu).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>
#include <string>

namespace nnrnn::cuda {

// "persistent <kernel version>: <plan>", or "fallback: <reason>", or "empty: ...", or
// "unavailable: <reason>".
// device -1: the current device.
std::string describe_path(int64_t N, int64_t B, c10::ScalarType dtype, int device);

}  // namespace nnrnn::cuda
