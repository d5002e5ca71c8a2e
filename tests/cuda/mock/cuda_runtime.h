// A host-only stand-in for the parts of CUDA's runtime that csrc/cuda/nccl.cu uses, so that
// the NCCL transport's host logic compiles with g++ and runs on the CPU (test_nccl_mock.py).
// Device memory is host memory; streams are ignored (everything runs in call order).
#pragma once

#include <cstddef>
#include <cstring>

typedef int cudaError_t;
typedef void* cudaStream_t;
enum cudaMemcpyKind { cudaMemcpyDeviceToDevice = 3, cudaMemcpyDefault = 4 };
static const cudaError_t cudaSuccess = 0;

inline const char* cudaGetErrorString(cudaError_t) { return "mock CUDA error"; }
// The current device, per thread as in CUDA (tests check that the library restores it).
inline int& mockCurrentDevice() {
  thread_local int device = 0;
  return device;
}
inline cudaError_t cudaSetDevice(int d) {
  mockCurrentDevice() = d;
  return cudaSuccess;
}
inline cudaError_t cudaGetDevice(int* d) {
  *d = mockCurrentDevice();
  return cudaSuccess;
}
inline cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t n, cudaMemcpyKind, cudaStream_t) {
  std::memmove(dst, src, n);
  return cudaSuccess;
}
