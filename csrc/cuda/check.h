// Error plumbing of the CUDA library: failures throw, and every C entry point (api.cu)
// turns the exception into a return code and a message.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace pycomm::cuda {

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error(what); }

#define PYCOMM_CUDA_CHECK(call)                                                         \
  do {                                                                                  \
    cudaError_t err_ = (call);                                                          \
    if (err_ != cudaSuccess)                                                            \
      ::pycomm::cuda::fail(std::string(#call) + ": " + cudaGetErrorString(err_));      \
  } while (0)

// The library links CUDA's runtime statically, so its notion of the current device is
// its own, not torch's: every entry point that touches a device selects it first.
inline void useDevice(int device) { PYCOMM_CUDA_CHECK(cudaSetDevice(device)); }

// Selects `device` for a scope and gives the caller back its own current device after it:
// the driver's current context is per thread and shared with torch's runtime, so a
// cudaSetDevice left behind would move the caller's later work to another GPU.
class DeviceGuard {
 public:
  // quiet: for destructors, which must not throw; a failed selection is then ignored.
  explicit DeviceGuard(int device, bool quiet = false) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (quiet)
      cudaSetDevice(device);
    else
      useDevice(device);
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

}  // namespace pycomm::cuda
