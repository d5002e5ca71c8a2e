// pycomm as a torch.distributed backend: a c10d::Backend over a pycomm Communicator.
//
// Operations run in call order on one worker thread per backend, so every call returns a
// Work at once and DDP overlaps its gradient all-reduces with the backward pass.  Tensors
// may be non-contiguous (staged through a contiguous copy); float16/bfloat16 are reduced in
// float32.  Operations it does not implement fall through to c10d::Backend, whose error
// names the operation and the backend.
#pragma once

#include <torch/csrc/distributed/c10d/Backend.hpp>

#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "algorithms/cost.h"
#include "communicator.h"

namespace pycomm {

class TorchBackend : public c10d::Backend {
 public:
  TorchBackend(std::shared_ptr<Communicator> comm, double timeoutS, CostModel model,
               std::string algoSetting, bool debug);
  ~TorchBackend() override;

  const std::string getBackendName() const override { return "pycomm"; }

  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& tensors,
                                           const c10d::BroadcastOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& tensors,
                                           const c10d::AllreduceOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allreduce_coalesced(
      std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                           std::vector<at::Tensor>& inputs,
                                           const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _allgather_base(at::Tensor& output, at::Tensor& input,
                                                 const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> allgather_into_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::AllgatherOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter(std::vector<at::Tensor>& outputs,
                                                std::vector<std::vector<at::Tensor>>& inputs,
                                                const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> _reduce_scatter_base(
      at::Tensor& output, at::Tensor& input, const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> reduce_scatter_tensor_coalesced(
      std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs,
      const c10d::ReduceScatterOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> barrier(const c10d::BarrierOptions& opts) override;
  c10::intrusive_ptr<c10d::Work> send(std::vector<at::Tensor>& tensors, int dstRank, int tag) override;
  c10::intrusive_ptr<c10d::Work> recv(std::vector<at::Tensor>& tensors, int srcRank, int tag) override;

 private:
  // Queues `fn` for the worker thread; the Work completes (or fails) with it and its
  // future carries `outputs`.
  c10::intrusive_ptr<c10d::Work> enqueue(c10d::OpType type, const char* name,
                                         std::vector<at::Tensor> outputs, std::function<void()> fn);
  void loop();
  // Posts a message and returns its Work; the worker progresses it while idle and every
  // collective carries it along, so isend/irecv never block each other.
  c10::intrusive_ptr<c10d::Work> postMessage(c10d::OpType type, const char* name, bool isSend, int peer,
                                             at::Tensor user, at::Tensor buf);
  void progressMessages();  // worker thread, mu_ not held
  Algo pick(Coll coll, size_t bytes) const;
  void allReduceTensor(at::Tensor& t, const c10d::ReduceOp& op);

  std::shared_ptr<Communicator> comm_;
  double timeout_;
  CostModel model_;
  std::string algoSetting_;
  bool debug_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  struct Message;
  std::vector<std::shared_ptr<Message>> messages_;  // posted, not yet complete (under mu_)
  bool stop_ = false;
  std::thread worker_;
};

}  // namespace pycomm
