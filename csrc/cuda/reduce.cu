// Reduction kernels for the GPU transports (reduce.cuh).
//
// Memory-bound: each element is read once from every source and written once, so the
// kernel is a grid-stride loop over 16-byte vectors where the pointers allow (one load
// instruction per source per 16 bytes) and over single elements otherwise.  The order of
// the sources is fixed, which is what makes every rank's result bitwise identical when
// each rank reduces the same sources (CUDA IPC's one-shot all-reduce).
//
// The types and ops are those of the CPU kernels (csrc/reduce.cpp): sum, prod, min, max
// (avg is reduced as a sum; the caller divides) for every type, and band, bor, bxor for
// the integers and bool.  bool is a byte holding 0 or 1, reduced as torch and gloo do:
// sum and max are "or", prod and min are "and".
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "cuda/check.h"
#include "cuda/reduce.cuh"

namespace pycomm::cuda {

namespace {

struct Sources {
  const void* p[kMaxSources];
  int n;
};

// Accumulator type: float for the half types, the type itself otherwise.
template <typename T> struct Acc { using type = T; };
template <> struct Acc<__half> { using type = float; };
template <> struct Acc<__nv_bfloat16> { using type = float; };

template <typename T> __device__ __forceinline__ typename Acc<T>::type up(T v) { return v; }
template <> __device__ __forceinline__ float up(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float up(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T down(typename Acc<T>::type v) { return v; }
template <> __device__ __forceinline__ __half down<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 down<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The casts bring back the small integer types, which C++ arithmetic promotes to int.
template <int OP, typename A> __device__ __forceinline__ A combine(A a, A b) {
  if constexpr (OP == int(RedOp::Sum)) return A(a + b);
  else if constexpr (OP == int(RedOp::Prod)) return A(a * b);
  else if constexpr (OP == int(RedOp::Min)) return b < a ? b : a;
  else if constexpr (OP == int(RedOp::Max)) return a < b ? b : a;
  else if constexpr (OP == int(RedOp::Band)) return A(a & b);
  else if constexpr (OP == int(RedOp::Bor)) return A(a | b);
  else return A(a ^ b);
}

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / sizeof(T);

template <typename T, int OP>
__global__ void reduceKernel(T* out, Sources s, size_t count, bool vectorized) {
  using A = typename Acc<T>::type;
  const size_t stride = size_t(gridDim.x) * blockDim.x;
  size_t start = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
  size_t done = 0;
  if (vectorized) {
    constexpr int V = kVec<T>;
    const size_t nvec = count / V;
    for (size_t v = start; v < nvec; v += stride) {
      A acc[V];
      uint4 raw = reinterpret_cast<const uint4*>(s.p[0])[v];
      const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = up<T>(x[k]);
      for (int r = 1; r < s.n; ++r) {
        raw = reinterpret_cast<const uint4*>(s.p[r])[v];
#pragma unroll
        for (int k = 0; k < V; ++k) acc[k] = combine<OP, A>(acc[k], up<T>(x[k]));
      }
      uint4 res;
      T* y = reinterpret_cast<T*>(&res);
#pragma unroll
      for (int k = 0; k < V; ++k) y[k] = down<T>(acc[k]);
      reinterpret_cast<uint4*>(out)[v] = res;
    }
    done = nvec * V;
  }
  for (size_t i = done + start; i < count; i += stride) {
    A acc = up<T>(static_cast<const T*>(s.p[0])[i]);
    for (int r = 1; r < s.n; ++r) acc = combine<OP, A>(acc, up<T>(static_cast<const T*>(s.p[r])[i]));
    out[i] = down<T>(acc);
  }
}

template <typename T>
void launch(void* out, const Sources& s, size_t count, DType dtype, RedOp op, cudaStream_t stream) {
  bool aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  for (int r = 0; r < s.n; ++r) aligned = aligned && reinterpret_cast<uintptr_t>(s.p[r]) % 16 == 0;
  const size_t work = aligned ? count / kVec<T> + 1 : count;
  const int threads = 512;
  // Enough blocks to fill any current GPU several times over; the loop strides the rest.
  const int blocks = int(std::min<size_t>((work + threads - 1) / threads, 1024));
  T* o = static_cast<T*>(out);
  switch (op) {
    case RedOp::Avg:  // a sum; the caller divides
    case RedOp::Sum: reduceKernel<T, int(RedOp::Sum)><<<blocks, threads, 0, stream>>>(o, s, count, aligned); break;
    case RedOp::Prod: reduceKernel<T, int(RedOp::Prod)><<<blocks, threads, 0, stream>>>(o, s, count, aligned); break;
    case RedOp::Min: reduceKernel<T, int(RedOp::Min)><<<blocks, threads, 0, stream>>>(o, s, count, aligned); break;
    case RedOp::Max: reduceKernel<T, int(RedOp::Max)><<<blocks, threads, 0, stream>>>(o, s, count, aligned); break;
    case RedOp::Band:
    case RedOp::Bor:
    case RedOp::Bxor:
      if constexpr (std::is_integral_v<T>) {
        if (op == RedOp::Band)
          reduceKernel<T, int(RedOp::Band)><<<blocks, threads, 0, stream>>>(o, s, count, aligned);
        else if (op == RedOp::Bor)
          reduceKernel<T, int(RedOp::Bor)><<<blocks, threads, 0, stream>>>(o, s, count, aligned);
        else
          reduceKernel<T, int(RedOp::Bxor)><<<blocks, threads, 0, stream>>>(o, s, count, aligned);
        break;
      }
      fail(std::string("no ") + redopName(op) + " reduction for " + dtypeName(dtype) +
           "; bitwise ops take integers or bool");
    default: fail(std::string("cannot reduce with ") + redopName(op));
  }
  PYCOMM_CUDA_CHECK(cudaGetLastError());
}

// bool's ops on its bytes (0 or 1): sum and max are "or", prod and min are "and".
RedOp logical(RedOp op) {
  switch (op) {
    case RedOp::Sum:
    case RedOp::Avg: return RedOp::Max;
    case RedOp::Prod: return RedOp::Min;
    default: return op;
  }
}

}  // namespace

void reduce(void* out, const void* const* srcs, int nsrcs, size_t count, DType dtype, RedOp op,
            cudaStream_t stream) {
  if (nsrcs < 1 || nsrcs > kMaxSources)
    fail("a reduction takes 1 to " + std::to_string(kMaxSources) + " sources, not " +
         std::to_string(nsrcs));
  if (count == 0) return;
  Sources s{};
  s.n = nsrcs;
  for (int r = 0; r < nsrcs; ++r) s.p[r] = srcs[r];
  switch (dtype) {
    case DType::U8: return launch<uint8_t>(out, s, count, dtype, op, stream);
    case DType::I8: return launch<int8_t>(out, s, count, dtype, op, stream);
    case DType::I16: return launch<int16_t>(out, s, count, dtype, op, stream);
    case DType::I32: return launch<int32_t>(out, s, count, dtype, op, stream);
    case DType::I64: return launch<int64_t>(out, s, count, dtype, op, stream);
    case DType::F32: return launch<float>(out, s, count, dtype, op, stream);
    case DType::F64: return launch<double>(out, s, count, dtype, op, stream);
    case DType::F16: return launch<__half>(out, s, count, dtype, op, stream);
    case DType::BF16: return launch<__nv_bfloat16>(out, s, count, dtype, op, stream);
    case DType::Bool: return launch<uint8_t>(out, s, count, dtype, logical(op), stream);
  }
  fail("unknown dtype code " + std::to_string(int(dtype)));
}

}  // namespace pycomm::cuda
