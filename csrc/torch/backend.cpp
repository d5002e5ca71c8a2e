#include "torch/backend.h"

#include <ATen/core/ivalue.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <optional>
#include <thread>

namespace py = pybind11;

namespace pycomm {

void pinStorage(const at::Tensor& t);    // torch/storage.cpp
void unpinStorage(const at::Tensor& t);

namespace {

// A c10d::Work completed by the pycomm Work it stands for (from a done-callback).
class AdapterWork : public c10d::Work {
 public:
  // `title` ("pycomm:all_reduce", a string literal: the profiler keeps the pointer) and
  // `inputs` are what the profiler records for the operation, from here to complete(), as
  // for gloo's "gloo:all_reduce".
  AdapterWork(c10d::OpType type, const char* title, const std::vector<at::Tensor>& inputs)
      : Work(-1, type, title, inputs),
        future_(c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()))) {}

  // Called once, without the GIL.  A timeout reads as c10d's backends word it ("Timed out"),
  // which is what callers of torch.distributed match.
  void complete(std::vector<at::Tensor> outputs, int source, const std::string& message, bool timedOut) {
    std::string error = message;
    if (timedOut) error = "pycomm backend: Timed out (the process group's timeout): " + message;
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
  // Whether the profiler records this operation (its event ends when the Work completes).
  bool profiled() const { return bool(recordFunctionEndCallback_); }
  // The thread that issued the operation.  A Work completed on it (the operation finished
  // before its done-callback was registered, or had nothing to do) would end the profiler's
  // event on the thread that began it, where c10d's backends end it on their worker.
  const std::thread::id issuer = std::this_thread::get_id();

  bool wait(std::chrono::milliseconds timeout) override {
    // Spin a few microseconds before blocking, no longer (csrc/worker.cpp says why).
    auto start = std::chrono::steady_clock::now();
    while (!isCompleted() && std::chrono::steady_clock::now() - start < std::chrono::microseconds(5)) {
    }
    return Work::wait(timeout);
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

// The largest all-reduce the native path runs on the calling thread (see nativeAllReduce).
constexpr size_t kInlineBytes = 64 << 10;

// work->complete(...), off the issuing thread (see AdapterWork::issuer).
void deliver(const c10::intrusive_ptr<AdapterWork>& work, std::vector<at::Tensor> outputs, int source,
             std::string message, bool timedOut) {
  if (std::this_thread::get_id() != work->issuer) {
    work->complete(std::move(outputs), source, message, timedOut);
    return;
  }
  std::thread([work, outputs = std::move(outputs), source, message = std::move(message), timedOut]() mutable {
    work->complete(std::move(outputs), source, message, timedOut);
  }).detach();
}

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

// One c10d tensor list, flattened (the profiler records its shapes).
std::vector<at::Tensor> flat(const std::vector<std::vector<at::Tensor>>& lists) {
  std::vector<at::Tensor> out;
  for (const auto& l : lists) out.insert(out.end(), l.begin(), l.end());
  return out;
}

// The op's code where it applies to the type as is, or -1 (avg, premul_sum, and bitwise ops
// on floats take the Python path, which adjusts or explains).
int nativeOp(const c10d::ReduceOp& op, bool floating) {
  switch (op.op_) {
    case c10d::ReduceOp::SUM: return int(RedOp::Sum);
    case c10d::ReduceOp::PRODUCT: return int(RedOp::Prod);
    case c10d::ReduceOp::MIN: return int(RedOp::Min);
    case c10d::ReduceOp::MAX: return int(RedOp::Max);
    case c10d::ReduceOp::BAND: return floating ? -1 : int(RedOp::Band);
    case c10d::ReduceOp::BOR: return floating ? -1 : int(RedOp::Bor);
    case c10d::ReduceOp::BXOR: return floating ? -1 : int(RedOp::Bxor);
    default: return -1;
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
c10::intrusive_ptr<c10d::Work> TorchBackend::call(c10d::OpType type, const char* method, const char* title,
                                                  const std::vector<at::Tensor>& inputs, Args&&... args) {
  ++seq_;
  auto work = c10::make_intrusive<AdapterWork>(type, title, inputs);
  py::gil_scoped_acquire gil;
  py::object w = adapter_.attr(method)(std::forward<Args>(args)...);
  static py::handle timeoutError =
      py::object(py::module_::import("pycomm.errors").attr("CommTimeoutError")).release();
  w.attr("add_done_callback")(py::cpp_function([work](py::object done) {
    std::vector<at::Tensor> outputs;
    int source = -1;
    std::string error;
    bool timedOut = false;
    py::object exc = done.attr("exception")();
    if (exc.is_none()) {
      outputs = done.attr("result")().cast<std::vector<at::Tensor>>();
      source = done.attr("source_rank").cast<int>();
    } else {
      error = py::str(exc).cast<std::string>();
      if (error.empty()) error = py::str(py::type::of(exc).attr("__name__")).cast<std::string>();
      timedOut = py::isinstance(exc, timeoutError);
    }
    py::gil_scoped_release nogil;
    deliver(work, std::move(outputs), source, std::move(error), timedOut);
  }));
  return work;
}

c10::intrusive_ptr<c10d::Work> TorchBackend::broadcast(std::vector<at::Tensor>& tensors,
                                                       const c10d::BroadcastOptions& opts) {
  return call(c10d::OpType::BROADCAST, "broadcast", "pycomm:broadcast", tensors, tensors, opts.rootRank, opts.rootTensor,
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::nativeAllReduce(const at::Tensor& t, const c10d::ReduceOp& op) {
  if (!native_ || !native_->enabled()) return {};
  const int dtype = NativeAllReduce::dtypeOf(t);
  const int rop = dtype < 0 ? -1 : nativeOp(op, at::isFloatingType(t.scalar_type()));
  if (rop < 0) return {};
  ++seq_;
  auto work = c10::make_intrusive<AdapterWork>(c10d::OpType::ALLREDUCE, "pycomm:all_reduce",
                                               std::vector<at::Tensor>{t});
  if (size_t(t.numel()) * t.element_size() <= kInlineBytes && !work->profiled() && native_->idle()) {
    // Small, nothing queued and not profiled: run on this thread and return the Work done.
    // Handing it to the worker and back costs two thread wake-ups, more than the collective
    // (~100 us against ~5 us on 2 cores); a profiled one goes to the worker, whose events end
    // off the issuing thread as gloo's do.  Larger ones stay asynchronous, so that DDP's
    // buckets overlap the backward pass.
    std::string error;
    bool timedOut = false;
    try {
      native_->runNow(t, dtype, rop);
    } catch (const TimeoutError& e) {
      error = e.what(), timedOut = true;
    } catch (const std::exception& e) {
      error = e.what();
    }
    work->complete({t}, -1, error, timedOut);
    return work;
  }
  std::shared_ptr<Completion> done = native_->submit(t, dtype, rop);
  std::weak_ptr<Completion> weak = done;
  done->onDone([work, weak, t] {
    auto c = weak.lock();
    const bool failed = c && c->kind() != Completion::None;
    deliver(work, {t}, -1, failed ? c->message() : std::string(), failed && c->kind() == Completion::Timeout);
  });
  return work;
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce(std::vector<at::Tensor>& tensors,
                                                       const c10d::AllreduceOptions& opts) {
  if (tensors.size() == 1)
    if (auto work = nativeAllReduce(tensors[0], opts.reduceOp)) return work;
  return call(c10d::OpType::ALLREDUCE, "allreduce", "pycomm:all_reduce", tensors, tensors, opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce_sparse(std::vector<at::Tensor>& tensors,
                                                              const c10d::AllreduceOptions& opts) {
  return call(c10d::OpType::ALLREDUCE, "allreduce_sparse", "pycomm:all_reduce_sparse", tensors, tensors, opName(opts.reduceOp),
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allreduce_coalesced(
    std::vector<at::Tensor>& tensors, const c10d::AllreduceCoalescedOptions& opts) {
  return call(c10d::OpType::ALLREDUCE_COALESCED, "allreduce_coalesced", "pycomm:all_reduce_coalesced", tensors,
              tensors,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce(std::vector<at::Tensor>& tensors,
                                                    const c10d::ReduceOptions& opts) {
  return call(c10d::OpType::REDUCE, "reduce", "pycomm:reduce", tensors, tensors, opts.rootRank, opts.rootTensor,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather(std::vector<std::vector<at::Tensor>>& outputs,
                                                       std::vector<at::Tensor>& inputs,
                                                       const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::ALLGATHER, "allgather", "pycomm:all_gather", inputs, outputs, inputs, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::_allgather_base(at::Tensor& output, at::Tensor& input,
                                                             const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::_ALLGATHER_BASE, "allgather_base", "pycomm:all_gather_into_tensor", {input}, output, input, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather_coalesced(
    std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs,
    const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::ALLGATHER_COALESCED, "allgather_coalesced", "pycomm:all_gather_coalesced", inputs, outputs, inputs,
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::allgather_into_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::AllgatherOptions& opts) {
  return call(c10d::OpType::COALESCED, "allgather_into_tensor_coalesced", "pycomm:all_gather_into_tensor_coalesced",
              inputs, outputs, inputs,
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::gather(std::vector<std::vector<at::Tensor>>& outputs,
                                                    std::vector<at::Tensor>& inputs,
                                                    const c10d::GatherOptions& opts) {
  return call(c10d::OpType::GATHER, "gather", "pycomm:gather", inputs, outputs, inputs, opts.rootRank, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::scatter(std::vector<at::Tensor>& outputs,
                                                     std::vector<std::vector<at::Tensor>>& inputs,
                                                     const c10d::ScatterOptions& opts) {
  return call(c10d::OpType::SCATTER, "scatter", "pycomm:scatter", flat(inputs), outputs, inputs, opts.rootRank, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce_scatter(std::vector<at::Tensor>& outputs,
                                                            std::vector<std::vector<at::Tensor>>& inputs,
                                                            const c10d::ReduceScatterOptions& opts) {
  return call(c10d::OpType::REDUCE_SCATTER, "reduce_scatter", "pycomm:reduce_scatter", flat(inputs), outputs, inputs, opName(opts.reduceOp),
              seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::_reduce_scatter_base(at::Tensor& output, at::Tensor& input,
                                                                  const c10d::ReduceScatterOptions& opts) {
  return call(c10d::OpType::_REDUCE_SCATTER_BASE, "reduce_scatter_base", "pycomm:reduce_scatter_tensor", {input}, output, input,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::reduce_scatter_tensor_coalesced(
    std::vector<at::Tensor>& outputs, std::vector<at::Tensor>& inputs, const c10d::ReduceScatterOptions& opts) {
  return call(c10d::OpType::COALESCED, "reduce_scatter_tensor_coalesced", "pycomm:reduce_scatter_tensor_coalesced",
              inputs, outputs, inputs,
              opName(opts.reduceOp), seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                           std::vector<int64_t>& outputSplitSizes,
                                                           std::vector<int64_t>& inputSplitSizes,
                                                           const c10d::AllToAllOptions& opts) {
  return call(c10d::OpType::ALLTOALL_BASE, "alltoall_base", "pycomm:all_to_all", {input}, output, input, outputSplitSizes,
              inputSplitSizes, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::alltoall(std::vector<at::Tensor>& outputs,
                                                      std::vector<at::Tensor>& inputs,
                                                      const c10d::AllToAllOptions& opts) {
  return call(c10d::OpType::ALLTOALL, "alltoall", "pycomm:all_to_all", inputs, outputs, inputs, seconds(opts.timeout));
}

c10::intrusive_ptr<c10d::Work> TorchBackend::barrier(const c10d::BarrierOptions& opts) {
  return call(c10d::OpType::BARRIER, "barrier", "pycomm:barrier", {}, seconds(opts.timeout));
}

void TorchBackend::monitoredBarrier(const c10d::BarrierOptions& opts, bool waitAllRanks) {
  // Blocking, as c10d's is; its errors (which rank did not arrive) propagate as raised.
  py::gil_scoped_acquire gil;
  adapter_.attr("monitored_barrier")(seconds(opts.timeout), waitAllRanks);
}

c10::intrusive_ptr<c10d::Work> TorchBackend::send(std::vector<at::Tensor>& tensors, int dst, int tag) {
  return call(c10d::OpType::SEND, "send", "pycomm:send", tensors, tensors, dst, tag);
}

c10::intrusive_ptr<c10d::Work> TorchBackend::recv(std::vector<at::Tensor>& tensors, int src, int tag) {
  return call(c10d::OpType::RECV, "recv", "pycomm:recv", tensors, tensors, src, tag);
}

c10::intrusive_ptr<c10d::Work> TorchBackend::recvAnysource(std::vector<at::Tensor>& tensors, int tag) {
  return call(c10d::OpType::RECVANYSOURCE, "recv", "pycomm:recvAnySource", tensors, tensors, -1, tag);
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
           "the c10d backend over `adapter` (pycomm.c10d.Adapter)")
      .def("enable_native", &TorchBackend::enableNative, py::arg("native"),
           "plain CPU all-reduces skip the Python adapter (pycomm._C.NativeAllReduce)");
}

}  // namespace pycomm
