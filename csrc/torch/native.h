// The native all-reduce: the latency-bound common case of both entry points, with no Python
// in between.  One CPU tensor that needs nothing adjusted (dense, contiguous, not a lazy
// negated or conjugated view, a type reduced as itself, an op other than avg) goes straight to
// the group's communicator as a row of the collective table:
// - pycomm.all_reduce calls run() first, which runs a blocking call at once when the group is
//   idle and says whether it did; anything else (or any doubt) takes the Python path, which
//   checks the call and says what is wrong;
// - the torch.distributed backend calls submit(), which queues it on the group's worker.
// A group makes one (pycomm/group.py) when its CPU transport is shared memory and
// PYCOMM_DEBUG is off; the algorithm for "auto" is PYCOMM_ALGO's choice, else the cost model's,
// as in Python.
#pragma once

#include <ATen/core/Tensor.h>
#include <pybind11/pybind11.h>

#include <atomic>
#include <memory>
#include <string>

#include <mutex>
#include <utility>
#include <vector>

#include "algorithms/cost.h"
#include "communicator.h"
#include "worker.h"

namespace pycomm {

class NativeAllReduce {
 public:
  NativeAllReduce(std::shared_ptr<Worker> worker, std::shared_ptr<Communicator> comm, CostModel model,
                  const std::string& algo, double timeoutS);

  // pycomm's dtype code of a tensor this path takes, or -1.
  static int dtypeOf(const at::Tensor& t);

  // pycomm.all_reduce(tensor, op, algorithm) done here if it can be: true once it has run
  // (errors raise as the communicator's), false when the Python path must take the call.
  bool run(pybind11::handle tensor, pybind11::handle op, pybind11::handle algorithm);

  // The backend's paths: queued on the group's worker (the tensor's storage pinned until it
  // ran), or run now on the calling thread (errors throw as the communicator's).
  std::shared_ptr<Completion> submit(const at::Tensor& t, int dtype, int op);
  void runNow(const at::Tensor& t, int dtype, int op);
  bool idle() const { return worker_->idle(); }

  // Off while the group has messages in flight (Python progresses them around collectives)
  // and once the group is closing.
  void setEnabled(bool on) { enabled_.store(on, std::memory_order_release); }
  bool enabled() const { return enabled_.load(std::memory_order_acquire); }

  // Registered shared-memory buffers (pycomm.empty): their all-reduces are left to the
  // Python path, which reduces straight out of the peers' buffers.
  void addShared(uintptr_t base, size_t bytes);
  void removeShared(uintptr_t base);

  // Seconds a collective may wait for a peer (the group's timeout, which may change).
  double timeout() const { return timeout_.load(std::memory_order_relaxed); }
  void setTimeout(double s) { timeout_.store(s, std::memory_order_relaxed); }

 private:
  Algo pick(size_t bytes) const;
  CollArgs args(const at::Tensor& t, Algo algo) const;  // the in-place all-reduce of t

  std::shared_ptr<Worker> worker_;
  std::shared_ptr<Communicator> comm_;
  CostModel model_;
  Algo forced_;  // PYCOMM_ALGO's all_reduce choice, or Algo::None
  std::atomic<double> timeout_;
  std::atomic<bool> enabled_{true};
  bool isShared(const at::Tensor& t) const;
  mutable std::mutex sharedMutex_;
  std::vector<std::pair<uintptr_t, size_t>> shared_;  // (base, bytes)
  std::atomic<bool> anyShared_{false};
};

}  // namespace pycomm
