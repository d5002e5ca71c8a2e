// The NCCL point-to-point transport: pycomm's plans executed as rounds of grouped
// ncclSend/ncclRecv (algorithms/rounds.h), reductions by our own kernels (reduce.cuh).
#pragma once

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <tuple>

#include "algorithms/collectives.h"
#include "algorithms/rounds.h"
#include "common.h"

namespace pycomm::cuda {

// The communicator is non-blocking (ncclConfig_t::blocking = 0): creating it and every
// group return at once, and NCCL's connection set-up, which waits for the peers, is polled
// instead of blocking inside a call: ready() for initialisation (the Python layer polls it
// against the group's timeout and names the ranks that never arrived), and each group's
// completion against `timeoutSeconds` here.  So a dead peer cannot hang a call, and
// abort() from the watchdog's thread never waits behind one.
class NcclComm {
 public:
  NcclComm(int device, int rank, int size, const ncclUniqueId& id, size_t pieceBytes,
           double timeoutSeconds = 0);
  ~NcclComm();
  // Safe to call from another thread while run() is polling, and more than once.
  void abort();
  // True once initialisation finished; throws if it failed or the comm was aborted.
  bool ready();

  size_t scratchBytes(Coll coll, Algo algo, size_t count, DType dtype, int root);
  void run(Coll coll, Algo algo, void* out, const void* in, void* scratch, size_t count,
           DType dtype, RedOp op, int root, cudaStream_t stream);
  void p2p(int n, const int* isSend, void* const* bufs, const size_t* bytes, const int* peers,
           cudaStream_t stream);
  // all_to_all with per-peer byte counts (size entries each): the pairwise plan in one
  // group, as NCCL's own all-to-all.  run() refuses all_to_all: its rounds would replay
  // every rank's plan from this rank's counts.
  void allToAll(void* out, const void* in, const size_t* sendBytes, const size_t* recvBytes,
                cudaStream_t stream);

 private:
  using Key = std::tuple<int, int, size_t, size_t, int>;  // coll, algo, count, esize, root
  // This rank's rounds, computed once per shape (pointers do not change them).
  const Rounds& rounds(const CollArgs& a);
  // Ends a group begun by ncclGroupStart and waits (polling) until NCCL has taken it.
  void endGroup();
  // Polls the comm's asynchronous state until it is no longer in progress.
  void settle(const char* what);
  void requireLive() const;

  int device_, rank_, size_;
  double timeoutSeconds_;
  std::atomic<bool> aborting_{false};
  size_t pieceBytes_;
  ncclComm_t comm_ = nullptr;
  std::mutex mu_;  // every use of comm_; abort() takes it after raising aborting_
  std::map<Key, std::unique_ptr<Rounds>> cache_;
};

}  // namespace pycomm::cuda
