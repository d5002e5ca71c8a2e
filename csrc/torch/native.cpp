#include "torch/native.h"

#include <torch/csrc/autograd/python_variable.h>

namespace py = pybind11;

namespace pycomm {

void pinStorage(const at::Tensor& t);  // torch/storage.cpp
void unpinStorage(const at::Tensor& t);

NativeAllReduce::NativeAllReduce(std::shared_ptr<Worker> worker, std::shared_ptr<Communicator> comm,
                                 CostModel model, const std::string& algo, double timeoutS)
    : worker_(std::move(worker)),
      comm_(std::move(comm)),
      model_(model),
      forced_(algoOverride(algo, Coll::AllReduce)),
      timeout_(timeoutS) {}

int NativeAllReduce::dtypeOf(const at::Tensor& t) {
  if (!t.device().is_cpu() || t.layout() != at::kStrided || !t.is_contiguous() || t.is_neg() || t.is_conj())
    return -1;
  switch (t.scalar_type()) {
    case at::kByte: return int(DType::U8);
    case at::kChar: return int(DType::I8);
    case at::kShort: return int(DType::I16);
    case at::kInt: return int(DType::I32);
    case at::kLong: return int(DType::I64);
    case at::kFloat: return int(DType::F32);
    case at::kDouble: return int(DType::F64);
    case at::kBool: return int(DType::Bool);
    default: return -1;  // half types are reduced in float32, complex as real views: Python
  }
}

Algo NativeAllReduce::pick(size_t bytes) const {
  return forced_ != Algo::None ? forced_ : choose(model_, Coll::AllReduce, double(bytes), comm_->size());
}

namespace {

bool is(PyObject* s, const char* name) { return PyUnicode_CompareWithASCIIString(s, name) == 0; }

// The op's code for a string op that applies to the type as is, or -1 (avg, ReduceOp objects
// and anything unexpected go to Python).
int opOf(PyObject* op, bool integral) {
  if (!PyUnicode_Check(op)) return -1;
  if (is(op, "sum")) return int(RedOp::Sum);
  if (is(op, "max")) return int(RedOp::Max);
  if (is(op, "min")) return int(RedOp::Min);
  if (is(op, "prod")) return int(RedOp::Prod);
  if (!integral) return -1;
  if (is(op, "band")) return int(RedOp::Band);
  if (is(op, "bor")) return int(RedOp::Bor);
  if (is(op, "bxor")) return int(RedOp::Bxor);
  return -1;
}

}  // namespace

bool NativeAllReduce::run(py::handle tensor, py::handle op, py::handle algorithm) {
  if (!enabled() || !THPVariable_Check(tensor.ptr()) || !PyUnicode_Check(algorithm.ptr())) return false;
  const at::Tensor& t = THPVariable_Unpack(tensor.ptr());
  const int dtype = dtypeOf(t);
  if (dtype < 0) return false;
  if (anyShared_.load(std::memory_order_acquire) && isShared(t)) return false;
  const int rop = opOf(op.ptr(), !at::isFloatingType(t.scalar_type()));
  if (rop < 0) return false;
  const size_t bytes = size_t(t.numel()) * t.element_size();
  Algo algo;
  if (is(algorithm.ptr(), "auto"))
    algo = pick(bytes);
  else if (is(algorithm.ptr(), "ring"))
    algo = Algo::Ring;
  else if (is(algorithm.ptr(), "tree"))
    algo = Algo::Tree;
  else if (is(algorithm.ptr(), "exchange"))
    algo = Algo::Exchange;
  else
    return false;
  if (!worker_->idle()) return false;  // asynchronous work first: the Python path orders it
  const CollArgs a = args(t, algo);
  py::gil_scoped_release nogil;
  comm_->collective(a, DType(dtype), RedOp(rop), timeout());
  return true;
}

void NativeAllReduce::addShared(uintptr_t base, size_t bytes) {
  std::lock_guard<std::mutex> lock(sharedMutex_);
  shared_.emplace_back(base, bytes);
  anyShared_.store(true, std::memory_order_release);
}

void NativeAllReduce::removeShared(uintptr_t base) {
  std::lock_guard<std::mutex> lock(sharedMutex_);
  for (size_t i = 0; i < shared_.size(); ++i)
    if (shared_[i].first == base) {
      shared_.erase(shared_.begin() + long(i));
      break;
    }
  anyShared_.store(!shared_.empty(), std::memory_order_release);
}

bool NativeAllReduce::isShared(const at::Tensor& t) const {
  const auto p = reinterpret_cast<uintptr_t>(t.data_ptr());
  std::lock_guard<std::mutex> lock(sharedMutex_);
  for (const auto& [base, bytes] : shared_)
    if (p >= base && p < base + bytes) return true;
  return false;
}

CollArgs NativeAllReduce::args(const at::Tensor& t, Algo algo) const {
  char* p = static_cast<char*>(t.data_ptr());
  return CollArgs{Coll::AllReduce, algo, comm_->size(), p, p, nullptr, size_t(t.numel()), 0, -1};
}

void NativeAllReduce::runNow(const at::Tensor& t, int dtype, int op) {
  comm_->collective(args(t, pick(size_t(t.numel()) * t.element_size())), DType(dtype), RedOp(op), timeout());
}

std::shared_ptr<Completion> NativeAllReduce::submit(const at::Tensor& t, int dtype, int op) {
  const CollArgs a = args(t, pick(size_t(t.numel()) * t.element_size()));
  auto comm = comm_;
  const double timeout = this->timeout();
  pinStorage(t);
  try {
    return worker_->submit([comm, a, t, dtype, op, timeout] {
      struct Unpin {
        const at::Tensor& t;
        ~Unpin() { unpinStorage(t); }
      } unpin{t};
      comm->collective(a, DType(dtype), RedOp(op), timeout);
    });
  } catch (...) {
    unpinStorage(t);
    throw;
  }
}

void bindNative(py::module_& m) {
  py::class_<NativeAllReduce, std::shared_ptr<NativeAllReduce>>(
      m, "NativeAllReduce", "the all-reduce both entry points run without Python (csrc/torch/native.h)")
      .def(py::init([](std::shared_ptr<Worker> worker, std::shared_ptr<Communicator> comm, double alpha,
                       double beta, double gamma, const std::string& algo, double timeout) {
             return std::make_shared<NativeAllReduce>(std::move(worker), std::move(comm),
                                                      CostModel{alpha, beta, gamma}, algo, timeout);
           }),
           py::arg("worker"), py::arg("communicator"), py::arg("alpha"), py::arg("beta"), py::arg("gamma"),
           py::arg("algo"), py::arg("timeout"))
      .def("__call__", &NativeAllReduce::run, py::arg("tensor"), py::arg("op"), py::arg("algorithm"),
           "runs a blocking all_reduce now if it needs no Python; returns whether it did")
      .def_property("enabled", &NativeAllReduce::enabled, &NativeAllReduce::setEnabled)
      .def("add_shared", &NativeAllReduce::addShared, py::arg("base"), py::arg("bytes"),
           "a registered shared buffer: its all-reduces go to the Python path")
      .def("remove_shared", &NativeAllReduce::removeShared, py::arg("base"))
      .def_property("timeout", &NativeAllReduce::timeout, &NativeAllReduce::setTimeout);
}

}  // namespace pycomm
