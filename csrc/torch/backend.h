// pycomm as a torch.distributed backend: a thin c10d adapter over pycomm's own Python
// path (pycomm/c10d.py), so the backend moves what pycomm.all_reduce & co. move (CPU
// tensors over shared memory, CUDA tensors over CUDA IPC or NCCL, groups across hosts) with
// the same checks, algorithms and errors.
//
// Each operation takes the GIL, hands its tensors and options to the Python adapter and
// returns a c10d::Work that completes with the pycomm Work it got back: its future is
// c10's (DDP's comm hooks chain on it) and wait() needs no GIL.  Errors raised while the
// call is checked propagate to the caller as the Python exceptions they are; errors of the
// collective itself arrive through wait() and the future as c10::DistBackendError.
#pragma once

#include <pybind11/pybind11.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "torch/native.h"

namespace pycomm {

class TorchBackend : public c10d::Backend {
 public:
  TorchBackend(int rank, int size, pybind11::object adapter);
  ~TorchBackend() override;

  const std::string getBackendName() const override { return "pycomm"; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                  const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce(std::vector<at::Tensor>& tensors,
                                        const c10d::ReduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_coalesced(std::vector<std::vector<at::Tensor>>& outputs,
                                                     std::vector<at::Tensor>& inputs,
                                                     const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> gather(std::vector<std::vector<at::Tensor>>& outputs,
                                        std::vector<at::Tensor>& inputs,
                                        const c10d::GatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> scatter(std::vector<at::Tensor>& outputs,
                                         std::vector<std::vector<at::Tensor>>& inputs,
                                         const c10d::ScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall_base(at::Tensor& output, at::Tensor& input,
                                               std::vector<int64_t>& outputSplitSizes,
                                               std::vector<int64_t>& inputSplitSizes,
                                               const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> alltoall(std::vector<at::Tensor>& outputs,
                                          std::vector<at::Tensor>& inputs,
                                          const c10d::AllToAllOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;
  void monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recvAnysource(std::vector<at::Tensor>& tensors, int tag) override;

  // TORCH_DISTRIBUTED_DEBUG=DETAIL and torch's desync checks read these.
  void setSequenceNumberForGroup() override {}
  uint64_t getSequenceNumberForGroup() override { return seq_.load(); }

  void abort() override;
  void shutdown() override;

  // The native path (torch/native.h): a plain all-reduce of one CPU tensor goes straight to
  // the group's worker, without the GIL; anything else goes through the Python adapter, which
  // checks it and says what is wrong.
  void enableNative(std::shared_ptr<NativeAllReduce> native) { native_ = std::move(native); }

 private:
  // adapter.<method>(*args): the returned pycomm Work becomes a c10d::Work of `type`, which
  // the profiler records as `title` (a string literal) with the shapes of `inputs`.
  template <typename... Args>
  c10::intrusive_ptr<c10d::Work> call(c10d::OpType type, const char* method, const char* title,
                                      const std::vector<at::Tensor>& inputs, Args&&... args);

  c10::intrusive_ptr<c10d::Work> nativeAllReduce(const at::Tensor& t, const c10d::ReduceOp& op);

  pybind11::object adapter_;
  std::atomic<uint64_t> seq_{0};
  std::shared_ptr<NativeAllReduce> native_;
};

}  // namespace pycomm
