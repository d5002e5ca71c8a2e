#include "torch/backend.h"

#include <ATen/core/ivalue.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <optional>

namespace py = pybind11;

namespace pycomm {

namespace {

// A c10d::Work completed by the pycomm Work it stands for (from a done-callback).
class AdapterWork : public c10d::Work {
 public:
  AdapterWork(c10d::OpType type, const char* title)
      : Work(-1, type, title),
        future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {}

  // Called once, without the GIL.
  void complete(std::vector<at::Tensor> outputs, int source, const std::string& error) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      outputs_ = outputs;
      source_ = source;
    }
    if (error.empty()) {
      future_->markCompleted(c10::IValue(outputs));
      finish(nullptr);
    } else {
      std::exception_ptr e;
      try {
        C10_THROW_ERROR(DistBackendError, error);
      } catch (...) {
        e = std::current_exception();
      }
      future_->setError(e);
      finish(e);
    }
  }
  std::vector<at::Tensor> result() override {
    std::lock_guard<std::mutex> lock(mutex_);
    return outputs_;
  }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }
  int sourceRank() const override {
    std::lock_guard<std::mutex> lock(mutex_);
    TORCH_CHECK(source_ >= 0, "pycomm backend: sourceRank() is known once a receive from any "
                              "source has completed; call wait() first");
    return source_;
  }

 private:
  c10::intrusive_ptr<c10::ivalue::Future> future_;
  std::vector<at::Tensor> outputs_;
  int source_ = -1;
};

std::string opName(const c10d::ReduceOp& op) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return "sum";
    case c10d::ReduceOp::AVG: return "avg";
    case c10d::ReduceOp::PRODUCT: return "prod";
    case c10d::ReduceOp::MIN: return "min";
    case c10d::ReduceOp::MAX: return "max";
    case c10d::ReduceOp::BAND: return "band";
    case c10d::ReduceOp::BOR: return "bor";
    case c10d::ReduceOp::BXOR: return "bxor";
    default: return "premul_sum";
  }
}

// None when torch left the option unset.
py::object seconds(std::chrono::milliseconds t) {
  if (t == c10d::kUnsetTimeout || t.count() < 0) return py::none();
  return py::float_(double(t.count()) / 1000.0);
}

}  // namespace

TorchBackend::TorchBackend(int rank, int size, py::object adapter)
    : Backend(rank, size), adapter_(std::move(adapter)) {}

TorchBackend::~TorchBackend() {
  if (!Py_IsInitialized()) {
    adapter_.release();  // the interpreter is gone: nothing left to decrement
    return;
  }
  py::gil_scoped_acquire gil;
  adapter_ = py::object();
}

template <typename... Args>
c10::intrusive_ptr<c10d::Work> TorchBackend::call(c10d::OpType type, const char* method, Args&&... args) {
  ++seq_;
  auto work = c10::make_intrusive<AdapterWork>(type, method);
  py::gil_scoped_acquire gil;
  py::object w = adapter_.attr(method)(std::forward<Args>(args)...);
  w.attr("add_done_callback")(py::cpp_function([work](py::object done) {
    std::vector<at::Tensor> outputs;
    int source = -1;
    std::string error;
    py::object exc = done.attr("exception")();
    if (exc.is_none()) {
      outputs = done.attr("result")().cast<std::vector<at::Tensor>>();
      source = done.attr("source_rank").cast<int>();
    } else {
      error = py::str(exc).cast<std::string>();
      if (error.empty()) error = py::str(py::type::of(exc).attr("__name__")).cast<std::string>();
    }
    py::gil_scoped_release nogil;
    work->complete(std::move(outputs), source, error);
  }));
  return work;
}

c10::intrusive_ptr<c10d::Work> TorchBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                       const c10d::BroadcastOptions& opts) {
  return call(c10d::OpType::BROADCAST, "broadcast", tensors, opts.rootRank, opts.rootTensor,
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::AllreduceOptions& opts) {
  return call(c10d::OpType::ALLREDUCE, "allreduce", tensors, opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                              const c10d::AllreduceOptions& opts) {
  return call(c10d::OpType::ALLREDUCE, "allreduce_sparse", tensors, opName(opts.reduceOp),
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce_coalesced(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) {
  return call(c10d::OpType::ALLREDUCE_COALESCED, "allreduce_coalesced", tensors,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce(std::vector<at::Tensor>& tensors,
                                                    const c10d::ReduceOptions& opts) {
  return call(c10d::OpType::REDUCE, "reduce", tensors, opts.rootRank, opts.rootTensor,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                       std::vector<at::Tensor>& inputs,
                                                       const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::ALLGATHER, "allgather", outputs, inputs, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                             const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::_ALLGATHER_BASE, "allgather_base", output, input, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather_coalesced(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::ALLGATHER_COALESCED, "allgather_coalesced", outputs, inputs,
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::COALESCED, "allgather_into_tensor_coalesced", outputs, inputs,
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                    std::vector<at::Tensor>& inputs,
                                                    const c10d::GatherOptions& opts) {
  return call(c10d::OpType::GATHER, "gather", outputs, inputs, opts.rootRank, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::scatter(std::vector<at::Tensor>& outputs,
                                                     std::vector<std::vector<at::Tensor>>& inputs,
                                                     const c10d::ScatterOptions& opts) {
  return call(c10d::OpType::SCATTER, "scatter", outputs, inputs, opts.rootRank, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                            std::vector<std::vector<at::Tensor>>& inputs,
                                                            const c10d::ReduceScatterOptions& opts) {
  return call(c10d::OpType::REDUCE_SCATTER, "reduce_scatter", outputs, inputs, opName(opts.reduceOp),
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                  const c10d::ReduceScatterOptions& opts) {
  return call(c10d::OpType::_REDUCE_SCATTER_BASE, "reduce_scatter_base", output, input,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  return call(c10d::OpType::COALESCED, "reduce_scatter_tensor_coalesced", outputs, inputs,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                           std::vector<int64_t>& outputSplitSizes,
                                                           std::vector<int64_t>& inputSplitSizes,
                                                           const c10d::AllToAllOptions& opts) {
  return call(c10d::OpType::ALLTOALL_BASE, "alltoall_base", output, input, outputSplitSizes,
              inputSplitSizes, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::alltoall(std::vector<at::Tensor>& outputs,
                                                      std::vector<at::Tensor>& inputs,
                                                      const c10d::AllToAllOptions& opts) {
  return call(c10d::OpType::ALLTOALL, "alltoall", outputs, inputs, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::barrier(const c10d::BarrierOptions& opts) {
  return call(c10d::OpType::BARRIER, "barrier", seconds(opts.timeout));
}

void TorchBackend::monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) {
  auto work = call(c10d::OpType::BARRIER, "monitored_barrier", seconds(opts.timeout), waitAllRanks);
  work->wait();
}

c10::intrusive_ptr<c10d::Work> TorchBackend::send(std::vector<at::Tensor>& tensors, int dst, int tag) {
  return call(c10d::OpType::SEND, "send", tensors, dst, tag);
}

c10::intrusive_ptr<c10d::Work> TorchBackend::recv(std::vector<at::Tensor>& tensors, int src, int tag) {
  return call(c10d::OpType::RECV, "recv", tensors, src, tag);
}

c10::intrusive_ptr<c10d::Work> TorchBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  return call(c10d::OpType::RECVANYSOURCE, "recv", tensors, -1, tag);
}

void TorchBackend::abort() {
  py::gil_scoped_acquire gil;
  adapter_.attr("abort")();
}

void TorchBackend::shutdown() {
  py::gil_scoped_acquire gil;
  adapter_.attr("shutdown")();
}

void bindTorchBackend(py::module_& m) {
  py::module_::import("torch.distributed");  // registers c10d::Backend with pybind
  py::class_<TorchBackend, c10d::Backend, c10::intrusive_ptr<TorchBackend>>(m, "TorchBackend")
      .def(py::init<int, int, py::object>(), py::arg("rank"), py::arg("size"), py::arg("adapter"),
           "the c10d backend over `adapter` (pycomm.c10d.Adapter)");
}

}  // namespace pycomm
