// Elementwise reduction kernels: dst[i] = a[i] op b[i].  `a` may alias `dst`.
// Half types are reduced by the Python layer in float32 (upcast once, round once), so the
// kernels cover the types that are reduced natively: sum, prod, min, max (and avg, as a
// sum) for every other type, and band, bor, bxor for integers and bool.
#pragma once

#include "common.h"

namespace pycomm {

// Throws std::invalid_argument for a (dtype, op) pair without a kernel.
void reduceInto(void* dst, const void* a, const void* b, size_t count, DType dtype, RedOp op);
bool canReduce(DType dtype);

}  // namespace pycomm
