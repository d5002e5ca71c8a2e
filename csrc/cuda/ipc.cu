// CUDA IPC buffers (ipc.cuh).  The phases of an IPC collective (stage, reduce, gather)
// are separated by host barriers in the Python layer rather than by flags that kernels
// spin on: several processes sharing one GPU are time-sliced, and a kernel spinning for a
// peer whose kernel cannot be resident at the same time would wait a whole time slice
// or, without preemption, forever.  A host barrier costs microseconds and inherits the
// shared-memory transport's timeouts and dead-peer detection.
#include "cuda/ipc.cuh"

#include <string>

#include "cuda/check.h"
#include "cuda/reduce.cuh"

namespace pycomm::cuda {

IpcBuffers::IpcBuffers(int device, size_t capacity) : device_(device), capacity_(capacity) {
  DeviceGuard dev(device_);
  PYCOMM_CUDA_CHECK(cudaMalloc(&mine_, capacity_));
  PYCOMM_CUDA_CHECK(cudaIpcGetMemHandle(&handle_, mine_));
}

IpcBuffers::~IpcBuffers() {
  DeviceGuard dev(device_, /*quiet=*/true);
  for (int r = 0; r < int(peers_.size()); ++r)
    if (r != rank_ && peers_[r]) cudaIpcCloseMemHandle(peers_[r]);
  if (mine_) cudaFree(mine_);
}

void IpcBuffers::open(int rank, int size, const cudaIpcMemHandle_t* handles) {
  if (size > kMaxSources)
    fail("CUDA IPC collectives take at most " + std::to_string(kMaxSources) + " ranks, not " +
         std::to_string(size));
  DeviceGuard dev(device_);
  rank_ = rank;
  peers_.assign(size, nullptr);
  for (int r = 0; r < size; ++r) {
    if (r == rank) {
      peers_[r] = mine_;
      continue;
    }
    void* p = nullptr;
    PYCOMM_CUDA_CHECK(cudaIpcOpenMemHandle(&p, handles[r], cudaIpcMemLazyEnablePeerAccess));
    peers_[r] = static_cast<char*>(p);
  }
}

void IpcBuffers::checkRange(size_t offset, size_t bytes) const {
  if (peers_.empty()) fail("CUDA IPC buffers used before open()");
  if (offset > capacity_ || bytes > capacity_ - offset)
    fail("CUDA IPC range [" + std::to_string(offset) + ", +" + std::to_string(bytes) +
         ") is outside the " + std::to_string(capacity_) + "-byte buffer");
}

void IpcBuffers::put(size_t offset, const void* src, size_t bytes, cudaStream_t stream) {
  checkRange(offset, bytes);
  DeviceGuard dev(device_);
  PYCOMM_CUDA_CHECK(cudaMemcpyAsync(mine_ + offset, src, bytes, cudaMemcpyDeviceToDevice, stream));
}

void IpcBuffers::get(int peer, void* dst, size_t offset, size_t bytes, cudaStream_t stream) {
  checkRange(offset, bytes);
  if (peer < 0 || peer >= int(peers_.size())) fail("no rank " + std::to_string(peer));
  DeviceGuard dev(device_);
  PYCOMM_CUDA_CHECK(cudaMemcpyAsync(dst, peers_[peer] + offset, bytes, cudaMemcpyDefault, stream));
}

void IpcBuffers::reduce(void* out, size_t offset, size_t count, DType dtype, RedOp op,
                        cudaStream_t stream) {
  checkRange(offset, count * dtypeSize(dtype));
  DeviceGuard dev(device_);
  std::vector<const void*> srcs(peers_.size());
  for (size_t r = 0; r < peers_.size(); ++r) srcs[r] = peers_[r] + offset;
  cuda::reduce(out, srcs.data(), int(srcs.size()), count, dtype, op, stream);
}

}  // namespace pycomm::cuda
