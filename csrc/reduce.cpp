// One loop per (op, type), written so the compiler vectorises it, and compiled for several
// instruction sets (target_clones): the package is built once and runs on any x86-64, but
// the reduction is memory-bound only if it uses the widest vectors the CPU has.
#include "reduce.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

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

template <typename T>
using Kernel = void (*)(T*, const T*, const T*, size_t);

// The kernels of one type, by RedOp code (nullptr: no such reduction for the type).
template <typename T>
struct Kernels {
  Kernel<T> byOp[kNumRedOps] = {};
};

#define PYCOMM_ARITH(SUFFIX, T)                   \
  PYCOMM_KERNEL(sum_##SUFFIX, T, T(x + y))        \
  PYCOMM_KERNEL(prod_##SUFFIX, T, T(x * y))       \
  PYCOMM_KERNEL(min_##SUFFIX, T, (y < x ? y : x)) \
  PYCOMM_KERNEL(max_##SUFFIX, T, (x < y ? y : x))
#define PYCOMM_BITWISE(SUFFIX, T)          \
  PYCOMM_KERNEL(band_##SUFFIX, T, T(x & y)) \
  PYCOMM_KERNEL(bor_##SUFFIX, T, T(x | y))  \
  PYCOMM_KERNEL(bxor_##SUFFIX, T, T(x ^ y))

PYCOMM_ARITH(u8, uint8_t)
PYCOMM_ARITH(i8, int8_t)
PYCOMM_ARITH(i16, int16_t)
PYCOMM_ARITH(i32, int32_t)
PYCOMM_ARITH(i64, int64_t)
PYCOMM_ARITH(f32, float)
PYCOMM_ARITH(f64, double)
PYCOMM_BITWISE(u8, uint8_t)
PYCOMM_BITWISE(i8, int8_t)
PYCOMM_BITWISE(i16, int16_t)
PYCOMM_BITWISE(i32, int32_t)
PYCOMM_BITWISE(i64, int64_t)

template <typename T>
Kernels<T> arith(Kernel<T> sum, Kernel<T> prod, Kernel<T> mn, Kernel<T> mx) {
  Kernels<T> k;
  k.byOp[int(RedOp::Sum)] = k.byOp[int(RedOp::Avg)] = sum;  // avg: a sum, divided later
  k.byOp[int(RedOp::Prod)] = prod;
  k.byOp[int(RedOp::Min)] = mn;
  k.byOp[int(RedOp::Max)] = mx;
  return k;
}
template <typename T>
Kernels<T> integer(Kernels<T> k, Kernel<T> band, Kernel<T> bor, Kernel<T> bxor) {
  k.byOp[int(RedOp::Band)] = band;
  k.byOp[int(RedOp::Bor)] = bor;
  k.byOp[int(RedOp::Bxor)] = bxor;
  return k;
}
// bool (one byte, 0 or 1) as torch and gloo reduce it: sum and max are "or", prod and
// min are "and".
Kernels<uint8_t> logical() {
  return integer(arith<uint8_t>(max_u8, min_u8, min_u8, max_u8), min_u8, max_u8, bxor_u8);
}

template <typename T>
void run(const Kernels<T>& ks, DType t, RedOp op, void* dst, const void* a, const void* b, size_t n) {
  int code = int(op);
  Kernel<T> k = code >= 0 && code < kNumRedOps ? ks.byOp[code] : nullptr;
  if (!k)
    throw std::invalid_argument(std::string("no ") + redopName(op) + " reduction for " + dtypeName(t));
  k(static_cast<T*>(dst), static_cast<const T*>(a), static_cast<const T*>(b), n);
}

}  // namespace

bool canReduce(DType t) { return t != DType::F16 && t != DType::BF16; }

void reduceInto(void* dst, const void* a, const void* b, size_t n, DType t, RedOp op) {
  static const auto u8 = integer(arith<uint8_t>(sum_u8, prod_u8, min_u8, max_u8), band_u8, bor_u8, bxor_u8);
  static const auto i8 = integer(arith<int8_t>(sum_i8, prod_i8, min_i8, max_i8), band_i8, bor_i8, bxor_i8);
  static const auto i16 =
      integer(arith<int16_t>(sum_i16, prod_i16, min_i16, max_i16), band_i16, bor_i16, bxor_i16);
  static const auto i32 =
      integer(arith<int32_t>(sum_i32, prod_i32, min_i32, max_i32), band_i32, bor_i32, bxor_i32);
  static const auto i64 =
      integer(arith<int64_t>(sum_i64, prod_i64, min_i64, max_i64), band_i64, bor_i64, bxor_i64);
  static const auto f32 = arith<float>(sum_f32, prod_f32, min_f32, max_f32);
  static const auto f64 = arith<double>(sum_f64, prod_f64, min_f64, max_f64);
  static const auto boolean = logical();
  switch (t) {
    case DType::U8: return run(u8, t, op, dst, a, b, n);
    case DType::I8: return run(i8, t, op, dst, a, b, n);
    case DType::I16: return run(i16, t, op, dst, a, b, n);
    case DType::I32: return run(i32, t, op, dst, a, b, n);
    case DType::I64: return run(i64, t, op, dst, a, b, n);
    case DType::F32: return run(f32, t, op, dst, a, b, n);
    case DType::F64: return run(f64, t, op, dst, a, b, n);
    case DType::Bool: return run(boolean, t, op, dst, a, b, n);
    default:
      throw std::invalid_argument(std::string("no reduction kernel for ") + dtypeName(t) +
                                  "; reduce it as float32");
  }
}

namespace {
// Pause iterations a helper spins for the next piece before it sleeps (tens of µs).
constexpr int kSpins = 4096;
}  // namespace

ReducePool::ReducePool(int threads) {
  if (threads < 1 || threads > 256)
    throw std::invalid_argument("reduction threads must be 1..256, got " + std::to_string(threads));
  helpers_.reserve(size_t(threads - 1));
  for (int i = 1; i < threads; ++i) helpers_.emplace_back(&ReducePool::helper, this, i);
}

ReducePool::~ReducePool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_.store(true, std::memory_order_release);
    generation_.fetch_add(1, std::memory_order_release);
  }
  wake_.notify_all();
  for (auto& t : helpers_) t.join();
}

void ReducePool::part(int index) {
  const Job& j = job_;
  const size_t begin = std::min(j.count, size_t(index) * j.per);
  const size_t end = std::min(j.count, begin + j.per);
  if (end > begin)
    reduceInto(j.dst + begin * j.esize, j.a + begin * j.esize, j.b + begin * j.esize, end - begin, j.dtype,
               j.op);
}

void ReducePool::helper(int index) {
  uint64_t seen = 0;
  for (;;) {
    int spins = 0;
    uint64_t g;
    while ((g = generation_.load(std::memory_order_acquire)) == seen) {
      if (++spins < kSpins) {
        cpuRelax();
        continue;
      }
      std::unique_lock<std::mutex> lock(mutex_);
      ++sleepers_;
      wake_.wait(lock, [&] { return stop_.load(std::memory_order_acquire) || generation_.load(std::memory_order_acquire) != seen; });
      --sleepers_;
      spins = 0;
    }
    seen = g;
    if (stop_.load(std::memory_order_acquire)) return;  // set before the generation moved
    part(index);  // validated by the caller: cannot throw
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ReducePool::reduce(void* dst, const void* a, const void* b, size_t count, DType dtype, RedOp op) {
  const size_t esize = dtypeSize(dtype);
  const int n = threads();
  if (n == 1 || count * esize < kSplitFrom * size_t(n)) return reduceInto(dst, a, b, count, dtype, op);
  reduceInto(dst, a, b, 0, dtype, op);  // throws here, not in a helper, for a pair without a kernel
  // Parts of whole cache lines, so no two threads write one line.
  const size_t line = std::max<size_t>(1, 64 / esize);
  size_t per = (count + size_t(n) - 1) / size_t(n);
  per = (per + line - 1) / line * line;
  job_ = Job{static_cast<char*>(dst), static_cast<const char*>(a), static_cast<const char*>(b), count, per,
             esize, dtype, op};
  pending_.store(n - 1, std::memory_order_relaxed);
  generation_.fetch_add(1, std::memory_order_release);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (sleepers_) wake_.notify_all();
  }
  part(0);
  while (pending_.load(std::memory_order_acquire) != 0) cpuRelax();
}

}  // namespace pycomm
