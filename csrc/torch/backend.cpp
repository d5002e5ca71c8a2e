#include "torch/backend.h"

#include <ATen/core/ivalue.h>
#include <torch/python.h>

#include <algorithm>
#include <cstdio>

#include "reduce.h"

namespace pycomm {

namespace {

class PycommWork : public c10d::Work {
 public:
  PycommWork(c10d::OpType type, const char* name, std::vector<at::Tensor> outputs)
      : Work(-1, type, name),
        outputs_(std::move(outputs)),
        future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {}

  void complete(std::exception_ptr e) {
    // Future first: DDP's comm hooks chain on it, and a waiter woken by finish() may
    // read it straight away.
    if (e)
      future_->setError(e);
    else
      future_->markCompleted(c10::IValue(outputs_));
    finish(e);
  }
  std::vector<at::Tensor> result() override { return outputs_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

DType dtypeOf(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kByte: return DType::U8;
    case at::kInt: return DType::I32;
    case at::kLong: return DType::I64;
    case at::kFloat: return DType::F32;
    case at::kDouble: return DType::F64;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, "pycomm backend: dtype ", t.scalar_type(),
                       " is not supported; use float32, float64, float16, bfloat16, int32, int64 or uint8");
  }
}

void checkCpu(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), "pycomm backend: ", op, " got a tensor on ", t.device(),
              "; the torch.distributed backend moves CPU tensors only. Use "
              "init_process_group('cpu:pycomm,cuda:nccl') to keep CUDA tensors on NCCL, or "
              "pycomm.all_reduce & co., which move CUDA tensors over CUDA IPC and NCCL.");
  TORCH_CHECK(t.layout() == at::kStrided, "pycomm backend: ", op, " needs dense tensors");
  dtypeOf(t);
}

// The reduction as pycomm's RedOp, and whether to divide by the group size afterwards.
std::pair<RedOp, bool> redop(const c10d::ReduceOp& op, const at::Tensor& t) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return {RedOp::Sum, false};
    case c10d::ReduceOp::AVG:
      TORCH_CHECK(at::isFloatingType(t.scalar_type()),
                  "pycomm backend: AVG needs a floating-point tensor; use SUM and divide");
      return {RedOp::Sum, true};
    case c10d::ReduceOp::PRODUCT: return {RedOp::Prod, false};
    case c10d::ReduceOp::MIN: return {RedOp::Min, false};
    case c10d::ReduceOp::MAX: return {RedOp::Max, false};
    default:
      TORCH_CHECK(false, "pycomm backend: reduce op ", int(op.op_),
                  " is not supported; use SUM, AVG, PRODUCT, MIN or MAX");
  }
}

bool isHalf(const at::Tensor& t) { return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16; }

// The contiguous buffer a reduction runs on: float32 for half types (upcast once, round
// once), a contiguous copy for strided tensors, else the tensor itself.
at::Tensor reductionBuffer(const at::Tensor& t) {
  if (isHalf(t)) return t.to(at::kFloat).contiguous();
  return t.is_contiguous() ? t : t.contiguous();
}

at::Tensor flat(const at::Tensor& t) { return t.is_contiguous() ? t.view(-1) : t.contiguous().view(-1); }

}  // namespace

TorchBackend::TorchBackend(std::shared_ptr<Communicator> comm, double timeoutS, CostModel model,
                           std::string algoSetting, bool debug)
    : Backend(comm->rank(), comm->size()),
      comm_(std::move(comm)),
      timeout_(timeoutS),
      model_(model),
      algoSetting_(std::move(algoSetting)),
      debug_(debug) {
  for (Coll c : {Coll::AllReduce, Coll::ReduceScatter, Coll::AllGather, Coll::Broadcast})
    algoOverride(algoSetting_, c);  // a malformed PYCOMM_ALGO fails here, not mid-training
  worker_ = std::thread([this] { loop(); });
}

TorchBackend::~TorchBackend() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (worker_.joinable()) worker_.join();
}

struct TorchBackend::Message {
  uint64_t id;
  c10::intrusive_ptr<PycommWork> work;
  at::Tensor user, buf;  // a receive into a non-contiguous tensor lands in buf first
  bool isSend;
};

void TorchBackend::loop() {
  for (;;) {
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Idle with messages in flight: wake often to move them.
      if (messages_.empty())
        cv_.wait(lock, [this] { return stop_ || !queue_.empty() || !messages_.empty(); });
      else
        cv_.wait_for(lock, std::chrono::microseconds(50), [this] { return stop_ || !queue_.empty(); });
      if (queue_.empty() && stop_) return;
      if (!queue_.empty()) {
        fn = std::move(queue_.front());
        queue_.pop_front();
      }
    }
    if (fn) fn();
    progressMessages();
  }
}

void TorchBackend::progressMessages() {
  std::vector<std::shared_ptr<Message>> mine;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (messages_.empty()) return;
    mine = messages_;
  }
  std::exception_ptr err;
  try {
    comm_->progress(0.002);
  } catch (...) {
    err = std::current_exception();
  }
  std::vector<std::shared_ptr<Message>> finished;
  for (auto& m : mine)
    if (err || comm_->done(m->id)) finished.push_back(m);
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& m : finished) messages_.erase(std::find(messages_.begin(), messages_.end(), m));
  }
  for (auto& m : finished) {
    if (!err && !m->isSend && !m->buf.is_same(m->user)) m->user.copy_(m->buf);
    m->work->complete(err);
  }
}

c10::intrusive_ptr<c10d::Work> TorchBackend::postMessage(c10d::OpType type, const char* name, bool isSend,
                                                         int peer, at::Tensor user, at::Tensor buf) {
  auto work = c10::make_intrusive<PycommWork>(type, name, std::vector<at::Tensor>{user});
  uint64_t id = comm_->post(P2POp{isSend, peer, buf.data_ptr(), buf.nbytes()}, timeout_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    messages_.push_back(std::make_shared<Message>(Message{id, work, user, buf, isSend}));
  }
  cv_.notify_one();
  return work;
}

c10::intrusive_ptr<c10d::Work> TorchBackend::enqueue(c10d::OpType type, const char* name,
                                                     std::vector<at::Tensor> outputs,
                                                     std::function<void()> fn) {
  auto work = c10::make_intrusive<PycommWork>(type, name, std::move(outputs));
  auto job = [work, fn = std::move(fn)]() {
    std::exception_ptr err;
    try {
      fn();
    } catch (...) {
      err = std::current_exception();
    }
    work->complete(err);
  };
  {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back(std::move(job));
  }
  cv_.notify_one();
  return work;
}

Algo TorchBackend::pick(Coll coll, size_t bytes) const {
  Algo a = algoOverride(algoSetting_, coll);
  if (a == Algo::None) a = choose(model_, coll, double(bytes), getSize());
  if (debug_)
    std::fprintf(stderr, "pycomm: %s of %zu B on rank %d/%d: %s over %s\n", collName(coll), bytes,
                 getRank(), getSize(), algoName(a), comm_->transport().name());
  return a;
}

void TorchBackend::allReduceTensor(at::Tensor& t, const c10d::ReduceOp& op) {
  auto [rop, avg] = redop(op, t);
  at::Tensor buf = reductionBuffer(t);
  comm_->allReduce(buf.data_ptr(), buf.data_ptr(), size_t(buf.numel()), dtypeOf(buf), rop,
                   pick(Coll::AllReduce, buf.nbytes()), timeout_);
  if (avg) buf.div_(getSize());
  if (!buf.is_same(t)) t.copy_(buf);
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::AllreduceOptions& opts) {
  for (auto& t : tensors) {
    checkCpu(t, "allreduce");
    redop(opts.reduceOp, t);
  }
  auto op = opts.reduceOp;
  return enqueue(c10d::OpType::ALLREDUCE, "pycomm:all_reduce", tensors, [this, tensors, op]() mutable {
    for (auto& t : tensors) allReduceTensor(t, op);
  });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce_coalesced(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) {
  for (auto& t : tensors) {
    checkCpu(t, "allreduce_coalesced");
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(),
                "pycomm backend: allreduce_coalesced needs tensors of one dtype");
    redop(opts.reduceOp, t);
  }
  auto op = opts.reduceOp;
  return enqueue(c10d::OpType::ALLREDUCE_COALESCED, "pycomm:all_reduce_coalesced", tensors,
                 [this, tensors, op]() mutable {
                   // One collective for all of them: flatten, reduce, scatter back.
                   std::vector<at::Tensor> flats;
                   for (auto& t : tensors) flats.push_back(t.reshape(-1));
                   at::Tensor all = at::cat(flats);
                   allReduceTensor(all, op);
                   int64_t off = 0;
                   for (auto& t : tensors) {
                     t.copy_(all.narrow(0, off, t.numel()).view(t.sizes()));
                     off += t.numel();
                   }
                 });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                       const c10d::BroadcastOptions& opts) {
  for (auto& t : tensors) checkCpu(t, "broadcast");
  int root = int(opts.rootRank);
  TORCH_CHECK(root >= 0 && root < getSize(), "pycomm backend: broadcast root ", root, " is not a rank");
  return enqueue(c10d::OpType::BROADCAST, "pycomm:broadcast", tensors, [this, tensors, root]() mutable {
    for (auto& t : tensors) {
      at::Tensor buf = t.is_contiguous() ? t : t.contiguous();
      comm_->broadcast(buf.data_ptr(), size_t(buf.numel()), dtypeOf(buf), root,
                       pick(Coll::Broadcast, buf.nbytes()), timeout_);
      if (!buf.is_same(t)) t.copy_(buf);
    }
  });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                             const c10d::AllgatherOptions&) {
  checkCpu(output, "all_gather_into_tensor");
  checkCpu(input, "all_gather_into_tensor");
  TORCH_CHECK(output.scalar_type() == input.scalar_type(), "pycomm backend: all_gather dtypes differ");
  TORCH_CHECK(output.numel() == input.numel() * getSize(), "pycomm backend: all_gather output has ",
              output.numel(), " elements; it needs world_size x ", input.numel());
  return enqueue(c10d::OpType::_ALLGATHER_BASE, "pycomm:all_gather_into_tensor", {output},
                 [this, output, input]() mutable {
                   at::Tensor in = input.contiguous();
                   at::Tensor out = output.is_contiguous() ? output : at::empty_like(output).contiguous();
                   comm_->allGather(out.data_ptr(), in.data_ptr(), size_t(in.numel()), dtypeOf(in),
                                    pick(Coll::AllGather, out.nbytes()), timeout_);
                   if (!out.is_same(output)) output.copy_(out);
                 });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                       std::vector<at::Tensor>& inputs,
                                                       const c10d::AllgatherOptions&) {
  TORCH_CHECK(inputs.size() == 1 && outputs.size() == 1,
              "pycomm backend: allgather takes one input and one output list per process");
  TORCH_CHECK(int(outputs[0].size()) == getSize(), "pycomm backend: allgather needs ", getSize(),
              " output tensors, got ", outputs[0].size());
  checkCpu(inputs[0], "allgather");
  for (auto& o : outputs[0]) {
    checkCpu(o, "allgather");
    TORCH_CHECK(o.numel() == inputs[0].numel() && o.scalar_type() == inputs[0].scalar_type(),
                "pycomm backend: every allgather output must match the input's size and dtype "
                "(uneven all_gather is not supported)");
  }
  auto outs = outputs[0];
  at::Tensor input = inputs[0];
  return enqueue(c10d::OpType::ALLGATHER, "pycomm:all_gather", outs, [this, outs, input]() mutable {
    at::Tensor in = input.contiguous();
    at::Tensor all = at::empty({in.numel() * getSize()}, in.options());
    comm_->allGather(all.data_ptr(), in.data_ptr(), size_t(in.numel()), dtypeOf(in),
                     pick(Coll::AllGather, all.nbytes()), timeout_);
    for (int r = 0; r < getSize(); ++r)
      outs[r].copy_(all.narrow(0, r * in.numel(), in.numel()).view(outs[r].sizes()));
  });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::AllgatherOptions& opts) {
  TORCH_CHECK(outputs.size() == inputs.size(), "pycomm backend: as many outputs as inputs");
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (size_t i = 0; i < inputs.size(); ++i) works.push_back(_allgather_base(outputs[i], inputs[i], opts));
  // Queued in order on one thread: the last one finishing means all have.
  return enqueue(c10d::OpType::COALESCED, "pycomm:all_gather_coalesced", outputs, [works]() {
    for (auto& w : works) w->wait();
  });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                  const c10d::ReduceScatterOptions& opts) {
  checkCpu(output, "reduce_scatter_tensor");
  checkCpu(input, "reduce_scatter_tensor");
  TORCH_CHECK(output.scalar_type() == input.scalar_type(), "pycomm backend: reduce_scatter dtypes differ");
  TORCH_CHECK(input.numel() == output.numel() * getSize(), "pycomm backend: reduce_scatter input has ",
              input.numel(), " elements; it needs world_size x ", output.numel());
  redop(opts.reduceOp, input);
  auto op = opts.reduceOp;
  return enqueue(c10d::OpType::_REDUCE_SCATTER_BASE, "pycomm:reduce_scatter_tensor", {output},
                 [this, output, input, op]() mutable {
                   auto [rop, avg] = redop(op, input);
                   at::Tensor in = reductionBuffer(input);
                   at::Tensor out = at::empty({output.numel()}, in.options());
                   comm_->reduceScatter(out.data_ptr(), in.data_ptr(), size_t(out.numel()), dtypeOf(in), rop,
                                        pick(Coll::ReduceScatter, in.nbytes()), timeout_);
                   if (avg) out.div_(getSize());
                   output.copy_(out.view(output.sizes()));
                 });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                            std::vector<std::vector<at::Tensor>>& inputs,
                                                            const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK(outputs.size() == 1 && inputs.size() == 1 && int(inputs[0].size()) == getSize(),
              "pycomm backend: reduce_scatter takes one output and world_size inputs");
  for (auto& t : inputs[0])
    TORCH_CHECK(t.numel() == outputs[0].numel(), "pycomm backend: reduce_scatter inputs must match the output");
  std::vector<at::Tensor> flats;
  for (auto& t : inputs[0]) flats.push_back(t.reshape(-1));
  at::Tensor all = at::cat(flats);
  return _reduce_scatter_base(outputs[0], all, opts);
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  TORCH_CHECK(outputs.size() == inputs.size(), "pycomm backend: as many outputs as inputs");
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  for (size_t i = 0; i < inputs.size(); ++i) works.push_back(_reduce_scatter_base(outputs[i], inputs[i], opts));
  return enqueue(c10d::OpType::COALESCED, "pycomm:reduce_scatter_coalesced", outputs, [works]() {
    for (auto& w : works) w->wait();
  });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::barrier(const c10d::BarrierOptions&) {
  return enqueue(c10d::OpType::BARRIER, "pycomm:barrier", {}, [this]() { comm_->barrier(timeout_); });
}

c10::intrusive_ptr<c10d::Work> TorchBackend::send(std::vector<at::Tensor>& tensors, int dst, int) {
  TORCH_CHECK(tensors.size() == 1, "pycomm backend: send takes one tensor");
  checkCpu(tensors[0], "send");
  TORCH_CHECK(dst >= 0 && dst < getSize() && dst != getRank(), "pycomm backend: send to rank ", dst,
              ": not another rank of this group");
  return postMessage(c10d::OpType::SEND, "pycomm:send", true, dst, tensors[0], tensors[0].contiguous());
}

c10::intrusive_ptr<c10d::Work> TorchBackend::recv(std::vector<at::Tensor>& tensors, int src, int) {
  TORCH_CHECK(tensors.size() == 1, "pycomm backend: recv takes one tensor");
  checkCpu(tensors[0], "recv");
  TORCH_CHECK(src >= 0 && src < getSize() && src != getRank(), "pycomm backend: recv from rank ", src,
              ": not another rank of this group");
  at::Tensor dst = tensors[0];
  return postMessage(c10d::OpType::RECV, "pycomm:recv", false, src, dst,
                     dst.is_contiguous() ? dst : at::empty_like(dst).contiguous());
}

void bindTorchBackend(pybind11::module_& m) {
  namespace py = pybind11;
  py::module_::import("torch.distributed");  // registers c10d::Backend with pybind
  py::class_<TorchBackend, c10d::Backend, c10::intrusive_ptr<TorchBackend>>(m, "TorchBackend")
      .def(py::init([](std::shared_ptr<Communicator> comm, double timeout, double alpha, double beta,
                       double gamma, std::string algo, bool debug) {
             return c10::make_intrusive<TorchBackend>(std::move(comm), timeout, CostModel{alpha, beta, gamma},
                                                      std::move(algo), debug);
           }),
           py::arg("communicator"), py::arg("timeout"), py::arg("alpha"), py::arg("beta"),
           py::arg("gamma"), py::arg("algo") = "", py::arg("debug") = false);
}

}  // namespace pycomm
