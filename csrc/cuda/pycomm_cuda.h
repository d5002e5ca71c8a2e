/* pycomm's CUDA library (pycomm/_pycomm_cuda.so): NCCL point-to-point and CUDA IPC
 * transports and the reduction kernels, with a C ABI.
 *
 * No torch headers: buffers are device pointers, streams are cudaStream_t passed as
 * void*, and the Python layer (pycomm/_cuda.py, through ctypes) owns tensors, streams and
 * events.  That is what lets CI build this library with nvcc on machines without a GPU
 * or a CUDA build of torch.
 *
 * Every function returns 0 on success; otherwise pycomm_cuda_error() says what failed
 * (per thread, until the next call).  dtype and op codes are pycomm's (csrc/common.h):
 * dtype 0 u8, 1 i32, 2 i64, 3 f32, 4 f64, 5 f16, 6 bf16, 7 i8, 8 i16, 9 bool; op 0 sum,
 * 1 prod, 2 min, 3 max, 5 avg (reduced as a sum; the caller divides), 6 band, 7 bor,
 * 8 bxor (integers and bool).
 * coll 0 all-reduce, 1 reduce-scatter, 2 all-gather, 3 broadcast, 6 reduce, 7 gather,
 * 8 scatter (9 all-to-all: pycomm_nccl_all_to_all); algo 0 ring, 1 tree.
 */
#ifndef PYCOMM_CUDA_H_
#define PYCOMM_CUDA_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PYCOMM_API __attribute__((visibility("default")))
#define PYCOMM_NCCL_ID_BYTES 128
#define PYCOMM_IPC_HANDLE_BYTES 64
#define PYCOMM_IPC_MAX_RANKS 8

PYCOMM_API const char* pycomm_cuda_error(void);
/* Versions as integers (CUDA 13000 = 13.0, NCCL 23203 = 2.32.3); driver is 0 when no
 * CUDA driver is installed, which is not an error. */
PYCOMM_API int pycomm_cuda_versions(int* runtime, int* driver, int* nccl);
PYCOMM_API int pycomm_cuda_device_count(int* count);

/* dst = a op b, elementwise, count elements; float16/bfloat16 are combined in float32 and
 * rounded once.  dst may be a or b. */
PYCOMM_API int pycomm_cuda_reduce(void* dst, const void* a, const void* b, size_t count, int dtype,
                                  int op, void* stream);

/* NCCL point-to-point transport: pycomm's ring and tree plans, cut into rounds
 * (csrc/algorithms/rounds.h), each round one ncclGroupStart/End of ncclSend/ncclRecv. */
PYCOMM_API int pycomm_nccl_unique_id(char id[PYCOMM_NCCL_ID_BYTES]);
/* Non-blocking: returns at once; poll pycomm_nccl_ready until *ready is 1 (the peers are
 * connected).  Later calls wait for NCCL to take each group for at most timeout_s seconds
 * (0: no limit), then fail instead of hanging on a dead peer. */
PYCOMM_API int pycomm_nccl_init(void** comm, int device, int rank, int size,
                                const char id[PYCOMM_NCCL_ID_BYTES], size_t piece_bytes,
                                double timeout_s);
PYCOMM_API int pycomm_nccl_ready(void* comm, int* ready);
PYCOMM_API int pycomm_nccl_destroy(void* comm);
/* Stops every operation in flight (a peer died or timed out); the comm is unusable after.
 * Safe from another thread while a call on the comm is waiting, and more than once. */
PYCOMM_API int pycomm_nccl_abort(void* comm);
/* Bytes of device scratch pycomm_nccl_run needs for this call. */
PYCOMM_API int pycomm_nccl_scratch_bytes(void* comm, int coll, int algo, size_t count, int dtype,
                                         int root, size_t* bytes);
/* Enqueues one collective on `stream`.  count: elements per rank (all-reduce, broadcast,
 * reduce: of the buffer; reduce-scatter, scatter: of the output; all-gather, gather: of
 * the input), as the collective table's rows say (csrc/algorithms/collectives.cpp).
 * Broadcast uses `out` as its buffer; reduce and gather write `out` on the root only.
 * Reductions need a dtype NCCL-side in the same precision on every rank; the Python
 * layer upcasts half types to float32 first.  all-to-all is refused: see below. */
PYCOMM_API int pycomm_nccl_run(void* comm, int coll, int algo, void* out, const void* in,
                               void* scratch, size_t count, int dtype, int op, int root,
                               void* stream);
/* All-to-all: sends send_bytes[j] bytes to rank j from consecutive blocks of `in` and
 * receives recv_bytes[j] bytes from rank j into consecutive blocks of `out` (size entries
 * each; zeros allowed; send_bytes[rank] == recv_bytes[rank], copied locally; out must not
 * overlap in), as one group of sends and receives.  What rank i sends to j must be what
 * j expects from i. */
PYCOMM_API int pycomm_nccl_all_to_all(void* comm, void* out, const void* in,
                                      const size_t* send_bytes, const size_t* recv_bytes,
                                      void* stream);
/* Point-to-point messages, in a group so that a batch of them cannot deadlock. */
PYCOMM_API int pycomm_nccl_p2p(void* comm, int n, const int* is_send, void* const* bufs,
                               const size_t* bytes, const int* peers, void* stream);

/* CUDA IPC transport for the ranks of one host (several processes may share one GPU):
 * each rank's buffer of `capacity` bytes is mapped by every other rank.  The Python layer
 * stages inputs into the buffers and separates the phases with host barriers. */
PYCOMM_API int pycomm_ipc_create(void** ipc, int device, size_t capacity,
                                 char handle[PYCOMM_IPC_HANDLE_BYTES]);
/* handles: size * PYCOMM_IPC_HANDLE_BYTES, in rank order (this rank's own is skipped). */
PYCOMM_API int pycomm_ipc_open(void* ipc, int rank, int size, const char* handles);
PYCOMM_API int pycomm_ipc_destroy(void* ipc);
/* This rank's own buffer (a device pointer), for kernels that write into it. */
PYCOMM_API int pycomm_ipc_pointer(void* ipc, void** mine);
/* Copies between a local device buffer and rank `peer`'s buffer at `offset`. */
PYCOMM_API int pycomm_ipc_put(void* ipc, size_t offset, const void* src, size_t bytes, void* stream);
PYCOMM_API int pycomm_ipc_get(void* ipc, int peer, void* dst, size_t offset, size_t bytes,
                              void* stream);
/* out[i] = op over ranks 0..size-1, in rank order, of buffer_r[offset + i] (count
 * elements): the same order on every rank, so results are bitwise identical. */
PYCOMM_API int pycomm_ipc_reduce(void* ipc, void* out, size_t offset, size_t count, int dtype,
                                 int op, void* stream);

#ifdef __cplusplus
}
#endif

#endif /* PYCOMM_CUDA_H_ */
