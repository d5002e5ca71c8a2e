// Reduction kernels: out = op over up to kMaxSources inputs, elementwise, in input
// order.  float16 and bfloat16 are accumulated in float32 and rounded once.  Every dtype
// of csrc/common.h, with the ops csrc/reduce.h gives it (bitwise: integers and bool).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "common.h"

namespace pycomm::cuda {

constexpr int kMaxSources = 8;

// Enqueues out[i] = src[0][i] op src[1][i] op ... on `stream` (any of the sources may be out).
void reduce(void* out, const void* const* srcs, int nsrcs, size_t count, DType dtype, RedOp op,
            cudaStream_t stream);

}  // namespace pycomm::cuda
