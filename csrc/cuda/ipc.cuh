// CUDA IPC buffers for the ranks of one host: every rank maps every other rank's buffer,
// so a kernel on one rank reads its peers' data directly (over NVLink between GPUs, or
// from the same GPU's memory when processes share one).
#pragma once

#include <cuda_runtime.h>

#include <vector>

#include "common.h"

namespace pycomm::cuda {

class IpcBuffers {
 public:
  IpcBuffers(int device, size_t capacity);
  ~IpcBuffers();
  cudaIpcMemHandle_t handle() const { return handle_; }
  char* mine() const { return mine_; }
  void open(int rank, int size, const cudaIpcMemHandle_t* handles);
  void put(size_t offset, const void* src, size_t bytes, cudaStream_t stream);
  void get(int peer, void* dst, size_t offset, size_t bytes, cudaStream_t stream);
  void reduce(void* out, size_t offset, size_t count, DType dtype, RedOp op, cudaStream_t stream);

 private:
  void checkRange(size_t offset, size_t bytes) const;
  int device_, rank_ = -1;
  size_t capacity_;
  char* mine_ = nullptr;
  cudaIpcMemHandle_t handle_{};
  std::vector<char*> peers_;  // peers_[rank_] == mine_
};

}  // namespace pycomm::cuda
