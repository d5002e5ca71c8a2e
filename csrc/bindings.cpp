// pycomm._C: the Python face of the C++ core.  Tensors cross as data pointers (the Python
// layer has already checked device, dtype, contiguity and sizes), and every call that
// communicates releases the GIL so async handles and other Python threads keep running.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "algorithms/cost.h"
#include "communicator.h"
#include "transport/shm.h"

namespace py = pybind11;
using namespace pycomm;

namespace pycomm {
void bindTorchBackend(py::module_& m);  // torch/backend.cpp: the only file with torch headers
}

namespace {

void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

Clock::time_point deadlineIn(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pycomm's C++ collectives: ring and tree algorithms over a shared-memory transport";

  // Translators run newest first, so the subclasses are registered after their base.
  auto& commError = py::register_exception<CommError>(m, "CommError", PyExc_RuntimeError);
  py::register_exception<TimeoutError>(m, "CommTimeoutError", commError.ptr());
  py::register_exception<MismatchError>(m, "CommMismatchError", commError.ptr());

  py::class_<Transport, std::shared_ptr<Transport>>(m, "Transport")
      .def_property_readonly("rank", &Transport::rank)
      .def_property_readonly("size", &Transport::size)
      .def_property_readonly("lanes", &Transport::lanes)
      .def_property_readonly("name", &Transport::name)
      .def("abort", &Transport::abort, py::arg("why"));

  py::class_<ShmTransport, Transport, std::shared_ptr<ShmTransport>>(m, "ShmTransport")
      .def(py::init([](int rank, int size, const std::string& name, size_t slotBytes, int slots,
                       int lanes) {
             ShmOptions o;
             o.slotBytes = slotBytes;
             o.slots = slots;
             o.lanes = lanes;
             return std::make_shared<ShmTransport>(rank, size, name, o);
           }),
           py::arg("rank"), py::arg("size"), py::arg("name"), py::arg("slot_bytes"),
           py::arg("slots"), py::arg("lanes"))
      .def(
          "attach",
          [](ShmTransport& t, const std::vector<std::string>& names, double timeoutS) {
            py::gil_scoped_release nogil;
            t.attach(names, deadlineIn(timeoutS));
          },
          py::arg("names"), py::arg("timeout"))
      .def("unlink", &ShmTransport::unlinkOwn)
      .def_property_readonly("segment_bytes", &ShmTransport::segmentBytes)
      .def_property_readonly("segment_name", &ShmTransport::segmentName);

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def(py::init<std::shared_ptr<Transport>>(), py::arg("transport"))
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("seq", &Communicator::seq)
      .def("all_reduce",
           [](Communicator& c, uintptr_t out, uintptr_t in, size_t count, int dtype, int op,
              int algo, double timeout) {
             py::gil_scoped_release nogil;
             c.allReduce(ptr(out), ptr(in), count, DType(dtype), RedOp(op), Algo(algo), timeout);
           })
      .def("reduce_scatter",
           [](Communicator& c, uintptr_t out, uintptr_t in, size_t count, int dtype, int op,
              int algo, double timeout) {
             py::gil_scoped_release nogil;
             c.reduceScatter(ptr(out), ptr(in), count, DType(dtype), RedOp(op), Algo(algo), timeout);
           })
      .def("all_gather",
           [](Communicator& c, uintptr_t out, uintptr_t in, size_t count, int dtype, int algo,
              double timeout) {
             py::gil_scoped_release nogil;
             c.allGather(ptr(out), ptr(in), count, DType(dtype), Algo(algo), timeout);
           })
      .def("broadcast",
           [](Communicator& c, uintptr_t buf, size_t count, int dtype, int root, int algo,
              double timeout) {
             py::gil_scoped_release nogil;
             c.broadcast(ptr(buf), count, DType(dtype), root, Algo(algo), timeout);
           })
      .def("barrier",
           [](Communicator& c, double timeout) {
             py::gil_scoped_release nogil;
             c.barrier(timeout);
           })
      .def(
          "post",
          [](Communicator& c, bool isSend, int peer, uintptr_t buf, size_t bytes, double timeout) {
            return c.post(P2POp{isSend, peer, ptr(buf), bytes}, timeout);
          },
          py::arg("is_send"), py::arg("peer"), py::arg("buf"), py::arg("bytes"), py::arg("timeout"))
      .def(
          "progress",
          [](Communicator& c, double slice) {
            py::gil_scoped_release nogil;
            return c.progress(slice);
          },
          py::arg("slice"))
      .def("done", &Communicator::done, py::arg("id"));

  bindTorchBackend(m);

  m.def(
      "predict",
      [](int coll, int algo, double bytes, int size, double alpha, double beta, double gamma) {
        return predict(CostModel{alpha, beta, gamma}, Coll(coll), Algo(algo), bytes, size);
      },
      py::arg("coll"), py::arg("algo"), py::arg("bytes"), py::arg("size"), py::arg("alpha"),
      py::arg("beta"), py::arg("gamma"), "seconds the alpha-beta model predicts (algorithms/cost.h)");
  m.def("tree_depth", &treeDepth, py::arg("size"));
  m.def(
      "algo_override",
      [](const std::string& setting, int coll) { return int(algoOverride(setting, Coll(coll))); },
      py::arg("setting"), py::arg("coll"),
      "PYCOMM_ALGO's choice for a collective: 0 ring, 1 tree, 2 left to the cost model");
  m.def(
      "tree",
      [](int rank, int size, int which) {
        TreeNode n = doubleTree(rank, size, which);
        return std::make_tuple(n.parent, n.child[0], n.child[1]);
      },
      py::arg("rank"), py::arg("size"), py::arg("which") = 0,
      "(parent, child0, child1) of `rank` in tree `which` of the double binary tree; -1 = none");
}
