// The C ABI of pycomm_cuda.h: each entry point runs its body, and turns any exception
// into a return code and a per-thread message.
#include "cuda/pycomm_cuda.h"

#include <cuda.h>
#include <nccl.h>

#include <cstring>
#include <string>

#include "cuda/check.h"
#include "cuda/ipc.cuh"
#include "algorithms/collectives.h"
#include "cuda/nccl.cuh"
#include "cuda/reduce.cuh"

using namespace pycomm;
using namespace pycomm::cuda;

namespace {

thread_local std::string lastError;

template <typename F>
int guarded(F&& body) {
  try {
    body();
    lastError.clear();
    return 0;
  } catch (const std::exception& e) {
    lastError = e.what();
  } catch (...) {
    lastError = "unknown error";
  }
  return 1;
}

cudaStream_t asStream(void* s) { return static_cast<cudaStream_t>(s); }

template <typename T>
T* handle(void* h, const char* what) {
  if (!h) fail(std::string(what) + " called with a null handle (already closed?)");
  return static_cast<T*>(h);
}

DType asDType(int d) {
  if (d < 0 || d >= kNumDTypes) fail("unknown dtype code " + std::to_string(d));
  return DType(d);
}

RedOp asOp(int op) {
  if (op < 0 || op >= kNumRedOps) fail("unknown reduction code " + std::to_string(op));
  return RedOp(op);
}

}  // namespace

extern "C" {

const char* pycomm_cuda_error(void) { return lastError.c_str(); }

int pycomm_cuda_versions(int* runtime, int* driver, int* nccl) {
  return guarded([&] {
    *runtime = CUDART_VERSION;
    // cudaDriverGetVersion reports 0 without failing when no driver is installed.
    if (cudaDriverGetVersion(driver) != cudaSuccess) *driver = 0;
    if (ncclGetVersion(nccl) != ncclSuccess) *nccl = 0;
  });
}

int pycomm_cuda_device_count(int* count) {
  return guarded([&] { PYCOMM_CUDA_CHECK(cudaGetDeviceCount(count)); });
}

int pycomm_cuda_reduce(void* dst, const void* a, const void* b, size_t count, int dtype, int op,
                       void* stream) {
  return guarded([&] {
    const void* srcs[2] = {a, b};
    reduce(dst, srcs, 2, count, asDType(dtype), asOp(op), asStream(stream));
  });
}

int pycomm_nccl_unique_id(char id[PYCOMM_NCCL_ID_BYTES]) {
  static_assert(sizeof(ncclUniqueId) == PYCOMM_NCCL_ID_BYTES, "NCCL unique ids are 128 bytes");
  return guarded([&] {
    ncclUniqueId u;
    ncclResult_t r = ncclGetUniqueId(&u);
    if (r != ncclSuccess) fail(std::string("ncclGetUniqueId: ") + ncclGetErrorString(r));
    std::memcpy(id, &u, sizeof u);
  });
}

int pycomm_nccl_init(void** comm, int device, int rank, int size, const char id[PYCOMM_NCCL_ID_BYTES],
                     size_t piece_bytes, double timeout_s) {
  return guarded([&] {
    ncclUniqueId u;
    std::memcpy(&u, id, sizeof u);
    *comm = new NcclComm(device, rank, size, u, piece_bytes, timeout_s);
  });
}

int pycomm_nccl_ready(void* comm, int* ready) {
  return guarded([&] { *ready = handle<NcclComm>(comm, "pycomm_nccl_ready")->ready() ? 1 : 0; });
}

int pycomm_nccl_destroy(void* comm) {
  return guarded([&] { delete handle<NcclComm>(comm, "pycomm_nccl_destroy"); });
}

int pycomm_nccl_abort(void* comm) {
  return guarded([&] { handle<NcclComm>(comm, "pycomm_nccl_abort")->abort(); });
}

int pycomm_nccl_scratch_bytes(void* comm, int coll, int algo, size_t count, int dtype, int root,
                              size_t* bytes) {
  return guarded([&] {
    *bytes = handle<NcclComm>(comm, "pycomm_nccl_scratch_bytes")->scratchBytes(Coll(coll), Algo(algo), count,
                                                        asDType(dtype), root);
  });
}

int pycomm_nccl_run(void* comm, int coll, int algo, void* out, const void* in, void* scratch,
                    size_t count, int dtype, int op, int root, void* stream) {
  return guarded([&] {
    RedOp r = collective(Coll(coll)).reduces ? asOp(op) : RedOp::None;
    handle<NcclComm>(comm, "pycomm_nccl_run")->run(Coll(coll), Algo(algo), out, in, scratch, count,
                                      asDType(dtype), r, root, asStream(stream));
  });
}

int pycomm_nccl_all_to_all(void* comm, void* out, const void* in, const size_t* send_bytes,
                           const size_t* recv_bytes, void* stream) {
  return guarded([&] {
    handle<NcclComm>(comm, "pycomm_nccl_all_to_all")->allToAll(out, in, send_bytes, recv_bytes, asStream(stream));
  });
}

int pycomm_nccl_p2p(void* comm, int n, const int* is_send, void* const* bufs, const size_t* bytes,
                    const int* peers, void* stream) {
  return guarded([&] {
    handle<NcclComm>(comm, "pycomm_nccl_p2p")->p2p(n, is_send, bufs, bytes, peers, asStream(stream));
  });
}

int pycomm_ipc_create(void** ipc, int device, size_t capacity, char handle[PYCOMM_IPC_HANDLE_BYTES]) {
  static_assert(sizeof(cudaIpcMemHandle_t) == PYCOMM_IPC_HANDLE_BYTES, "IPC handles are 64 bytes");
  return guarded([&] {
    auto* b = new IpcBuffers(device, capacity);
    cudaIpcMemHandle_t h = b->handle();
    std::memcpy(handle, &h, sizeof h);
    *ipc = b;
  });
}

int pycomm_ipc_open(void* ipc, int rank, int size, const char* handles) {
  return guarded([&] {
    std::vector<cudaIpcMemHandle_t> hs(size);
    std::memcpy(hs.data(), handles, size * sizeof(cudaIpcMemHandle_t));
    handle<IpcBuffers>(ipc, "pycomm_ipc")->open(rank, size, hs.data());
  });
}

int pycomm_ipc_destroy(void* ipc) {
  return guarded([&] { delete handle<IpcBuffers>(ipc, "pycomm_ipc_destroy"); });
}

int pycomm_ipc_pointer(void* ipc, void** mine) {
  return guarded([&] { *mine = handle<IpcBuffers>(ipc, "pycomm_ipc")->mine(); });
}

int pycomm_ipc_put(void* ipc, size_t offset, const void* src, size_t bytes, void* stream) {
  return guarded([&] { handle<IpcBuffers>(ipc, "pycomm_ipc")->put(offset, src, bytes, asStream(stream)); });
}

int pycomm_ipc_get(void* ipc, int peer, void* dst, size_t offset, size_t bytes, void* stream) {
  return guarded([&] { handle<IpcBuffers>(ipc, "pycomm_ipc")->get(peer, dst, offset, bytes, asStream(stream)); });
}

int pycomm_ipc_reduce(void* ipc, void* out, size_t offset, size_t count, int dtype, int op, void* stream) {
  return guarded([&] {
    handle<IpcBuffers>(ipc, "pycomm_ipc")->reduce(out, offset, count, asDType(dtype), asOp(op), asStream(stream));
  });
}

}  // extern "C"
