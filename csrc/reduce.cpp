// One loop per (op, type), written so the compiler vectorises it, and compiled for several
// instruction sets (target_clones): the package is built once and runs on any x86-64, but
// the reduction is memory-bound only if it uses the widest vectors the CPU has.
#include "reduce.h"

#include <cstdint>

namespace pycomm {
namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYCOMM_MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define PYCOMM_MULTIVERSION
#endif

// No __restrict__: `a` aliases `d` for in-place reductions; GCC versions the loop on an
// overlap check and still vectorises it.
#define PYCOMM_KERNEL(NAME, T, EXPR)                                                      \
  PYCOMM_MULTIVERSION void NAME(T* d, const T* a, const T* b, size_t n) {                   \
    for (size_t i = 0; i < n; ++i) {                                                      \
      T x = a[i], y = b[i];                                                               \
      d[i] = (EXPR);                                                                      \
    }                                                                                     \
  }

#define PYCOMM_KERNELS(SUFFIX, T)               \
  PYCOMM_KERNEL(sum_##SUFFIX, T, T(x + y))      \
  PYCOMM_KERNEL(prod_##SUFFIX, T, T(x * y))     \
  PYCOMM_KERNEL(min_##SUFFIX, T, (y < x ? y : x)) \
  PYCOMM_KERNEL(max_##SUFFIX, T, (x < y ? y : x))

PYCOMM_KERNELS(u8, uint8_t)
PYCOMM_KERNELS(i32, int32_t)
PYCOMM_KERNELS(i64, int64_t)
PYCOMM_KERNELS(f32, float)
PYCOMM_KERNELS(f64, double)

template <typename T>
using Kernel = void (*)(T*, const T*, const T*, size_t);

template <typename T>
void run(Kernel<T> sum, Kernel<T> prod, Kernel<T> mn, Kernel<T> mx, RedOp op, void* dst,
         const void* a, const void* b, size_t n) {
  Kernel<T> k = nullptr;
  switch (op) {
    case RedOp::Sum: k = sum; break;
    case RedOp::Prod: k = prod; break;
    case RedOp::Min: k = mn; break;
    case RedOp::Max: k = mx; break;
    case RedOp::None: break;
  }
  if (!k) throw std::invalid_argument("reduction op 'none' has no kernel");
  k(static_cast<T*>(dst), static_cast<const T*>(a), static_cast<const T*>(b), n);
}

}  // namespace

bool canReduce(DType t) { return t != DType::F16 && t != DType::BF16; }

void reduceInto(void* dst, const void* a, const void* b, size_t n, DType t, RedOp op) {
  switch (t) {
    case DType::U8: return run<uint8_t>(sum_u8, prod_u8, min_u8, max_u8, op, dst, a, b, n);
    case DType::I32: return run<int32_t>(sum_i32, prod_i32, min_i32, max_i32, op, dst, a, b, n);
    case DType::I64: return run<int64_t>(sum_i64, prod_i64, min_i64, max_i64, op, dst, a, b, n);
    case DType::F32: return run<float>(sum_f32, prod_f32, min_f32, max_f32, op, dst, a, b, n);
    case DType::F64: return run<double>(sum_f64, prod_f64, min_f64, max_f64, op, dst, a, b, n);
    default:
      throw std::invalid_argument(std::string("no reduction kernel for ") + dtypeName(t) +
                                  "; reduce it as float32");
  }
}

}  // namespace pycomm
