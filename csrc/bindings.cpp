// pycomm._C: the Python face of the C++ core.  Tensors cross as data pointers (the Python
// layer has already checked device, dtype, contiguity and sizes), and every call that
// communicates releases the GIL so async handles and other Python threads keep running.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <tuple>

#include "algorithms/algorithms.h"
#include "algorithms/cost.h"
#include "algorithms/collectives.h"
#include "algorithms/rounds.h"
#include "communicator.h"
#include "transport/shm.h"
#include "worker.h"

namespace py = pybind11;
using namespace pycomm;

namespace pycomm {
void bindTorchBackend(py::module_& m);  // torch/: the only files with torch headers
void bindStorage(py::module_& m);
void bindNative(py::module_& m);
}

namespace {

void* ptr(uintptr_t p) { return reinterpret_cast<void*>(p); }

// A Python object a C++ thread may copy and drop without the GIL: the last owner takes the
// GIL to release it.
std::shared_ptr<py::object> pyHeld(py::object o) {
  return std::shared_ptr<py::object>(new py::object(std::move(o)), [](py::object* p) {
    if (!Py_IsInitialized()) {
      p->release();  // the interpreter is gone
    } else {
      py::gil_scoped_acquire gil;
      delete p;
      return;
    }
    delete p;
  });
}

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
      .def("leave", &ShmTransport::leave, py::arg("reason"),
           "this rank leaves the group alive: peers that still need it fail at once")
      .def("gone", &ShmTransport::gone,
           "[(group rank, why)] of the peers that exited, left the group or are stopped")
      .def_static("reap_if_stale", &ShmTransport::reapIfStale, py::arg("name"))
      .def("_corrupt_for_test", &ShmTransport::corruptForTest, py::arg("what"))
      .def("set_single_copy", &ShmTransport::setSingleCopy, py::arg("min_bytes"),
           "before attach: sends of at least min_bytes go single-copy (2**64-1: never)")
      .def_property_readonly("single_copy_from", &ShmTransport::singleCopyFrom)
      .def_property_readonly("can_read_peers", &ShmTransport::canReadPeers,
                             "whether the start-up probe could read every peer's memory")
      .def_property_readonly("single_copy_why", &ShmTransport::singleCopyWhy,
                             "why the probe failed ('' if it did not)")
      .def_property_readonly("single_copy_sent", &ShmTransport::singleCopySent,
                             "bytes this rank has sent single-copy")
      .def("set_reduce_threads", &ShmTransport::setReduceThreads, py::arg("threads"),
           "while no collective runs: threads this rank reduces received pieces with")
      .def_property_readonly("reduce_threads", &ShmTransport::reduceThreads)
;

  py::class_<ReducePool>(m, "ReducePool",
                         "the transport's elementwise reduction on several threads (tests, bench)")
      .def(py::init<int>(), py::arg("threads"))
      .def_property_readonly("threads", &ReducePool::threads)
      .def(
          "reduce",
          [](ReducePool& p, uintptr_t dst, uintptr_t a, uintptr_t b, size_t count, int dtype, int op) {
            if (dtype < 0 || dtype >= kNumDTypes || op < 0 || op >= kNumRedOps)
              throw std::invalid_argument("unknown dtype or op code");
            py::gil_scoped_release nogil;
            p.reduce(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(a),
                     reinterpret_cast<const void*>(b), count, DType(dtype), RedOp(op));
          },
          py::arg("dst"), py::arg("a"), py::arg("b"), py::arg("count"), py::arg("dtype"), py::arg("op"),
          "dst[i] = a[i] op b[i] for raw addresses (codes as DTYPES/REDOPS)");

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def(py::init<std::shared_ptr<Transport>>(), py::arg("transport"))
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("seq", &Communicator::seq)
      .def_property_readonly("transport", &Communicator::transportPtr)
      .def(
          "collective",
          [](Communicator& c, int coll, int algo, uintptr_t out, uintptr_t in, size_t count, int dtype,
             int op, int root, double timeout, const std::vector<size_t>& sendCounts,
             const std::vector<size_t>& recvCounts) {
            CollArgs a{Coll(coll), Algo(algo), c.size(), static_cast<char*>(ptr(out)),
                       static_cast<const char*>(ptr(in)), nullptr, count, 0, root};
            if (!sendCounts.empty()) a.sendCounts = sendCounts.data();
            if (!recvCounts.empty()) a.recvCounts = recvCounts.data();
            py::gil_scoped_release nogil;
            c.collective(a, DType(dtype), RedOp(op), timeout);
          },
          py::arg("coll"), py::arg("algo"), py::arg("out"), py::arg("input"), py::arg("count"),
          py::arg("dtype"), py::arg("op"), py::arg("root"), py::arg("timeout"),
          py::arg("send_counts") = std::vector<size_t>{}, py::arg("recv_counts") = std::vector<size_t>{},
          "one collective of the table (codes: COLLECTIVES, ALGORITHMS, DTYPES, OPS); buffers "
          "are data pointers, counts as the table's rows say; send_counts/recv_counts: "
          "all_to_all's elements to and from each rank (empty: count each)")
      .def("barrier",
           [](Communicator& c, double timeout) {
             py::gil_scoped_release nogil;
             c.barrier(timeout);
           })
      .def(
          "post",
          [](Communicator& c, bool isSend, int peer, uintptr_t buf, size_t bytes, double timeout,
             int32_t tag) {
            py::gil_scoped_release nogil;  // waits for a progress() call on another thread
            return c.post(P2POp{isSend, peer, ptr(buf), bytes, tag}, timeout);
          },
          py::arg("is_send"), py::arg("peer"), py::arg("buf"), py::arg("bytes"), py::arg("timeout"),
          py::arg("tag") = 0,
          "posts a message (peer -1: a receive from any source); returns its id.  The buffer "
          "must stay valid until completed() reports the id (or cancel() returns it)")
      .def(
          "progress",
          [](Communicator& c, double slice) {
            py::gil_scoped_release nogil;
            return c.progress(slice);
          },
          py::arg("slice"))
      .def(
          "completed",
          [](Communicator& c) {
            std::vector<MessageDone> done;
            {
              py::gil_scoped_release nogil;
              done = c.completed();
            }
            py::list out;
            for (const MessageDone& d : done) out.append(py::make_tuple(d.id, d.peer));
            return out;
          },
          "[(id, peer)] of the messages completed since the last call, each once; peer is "
          "the sender for a receive, the destination for a send")
      .def(
          "cancel",
          [](Communicator& c) {
            py::gil_scoped_release nogil;
            return c.cancel();
          },
          "forgets every pending message (nothing touches their buffers afterwards); their ids");

  py::class_<Completion, std::shared_ptr<Completion>>(m, "Completion")
      .def("done", &Completion::done)
      .def(
          "wait",
          [](Completion& c, double timeout) {
            py::gil_scoped_release nogil;
            return c.wait(timeout);
          },
          py::arg("timeout") = -1.0, "blocks until done; False if `timeout` (s, >= 0) passed first")
      .def_property_readonly("kind", [](const Completion& c) { return int(c.kind()); },
                             "0 ok, 1 CommError, 2 CommTimeoutError, 3 CommMismatchError, 4 other")
      .def_property_readonly("message", &Completion::message)
      .def(
          "on_done",
          [](Completion& c, py::function fn) {
            auto held = pyHeld(std::move(fn));
            c.onDone([held] {
              py::gil_scoped_acquire gil;
              try {
                (*held)();
              } catch (py::error_already_set& e) {
                e.discard_as_unraisable("pycomm: a done-callback");
              }
            });
          },
          py::arg("fn"), "fn() once done (at once if it is), on the thread that finishes it");

  py::class_<Worker, std::shared_ptr<Worker>>(m, "Worker")
      .def(py::init<std::string>(), py::arg("name"))
      .def(
          "submit",
          [](Worker& w, py::function fn) {
            auto held = pyHeld(std::move(fn));
            return w.submit([held] {
              py::gil_scoped_acquire gil;
              (*held)();
            });
          },
          py::arg("fn"), "fn() with the GIL, after everything submitted before it")
      .def(
          "submit_collective",
          [](Worker& w, std::shared_ptr<Communicator> c, int coll, int algo, uintptr_t out, uintptr_t in,
             size_t count, int dtype, int op, int root, double timeout) {
            CollArgs a{Coll(coll), Algo(algo), c->size(), static_cast<char*>(ptr(out)),
                       static_cast<const char*>(ptr(in)), nullptr, count, 0, root};
            return w.submit([c, a, dtype, op, timeout] { c->collective(a, DType(dtype), RedOp(op), timeout); });
          },
          "a collective of the table as a job that runs without the GIL (the caller keeps the "
          "buffers alive until the Completion says done)")
      .def("drain",
           [](Worker& w) {
             py::gil_scoped_release nogil;
             w.drain();
           })
      .def("idle", &Worker::idle)
      .def("close", [](Worker& w) {
        py::gil_scoped_release nogil;
        w.close();
      });

  bindTorchBackend(m);
  bindStorage(m);
  bindNative(m);

  // The codes of csrc/common.h by name, and the collective table's rows: Python reads them
  // here instead of keeping copies.
  py::dict dtypes, ops, algos, colls;
  for (int d = 0; d < kNumDTypes; ++d) dtypes[dtypeName(DType(d))] = d;
  for (int o = 0; o < kNumRedOps; ++o) ops[redopName(RedOp(o))] = o;
  for (Algo a : {Algo::Ring, Algo::Tree, Algo::None, Algo::Pairwise, Algo::Exchange}) algos[algoName(a)] = int(a);
  py::list table;
  for (const Collective& c : collectives()) {
    colls[c.name] = int(c.coll);
    py::list names, formulas;
    for (const AlgoEntry& e : c.algos) {
      names.append(algoName(e.algo));
      formulas.append(e.formula);
    }
    table.append(py::dict(py::arg("name") = c.name, py::arg("code") = int(c.coll),
                          py::arg("setting") = c.setting ? py::cast(c.setting) : py::none(),
                          py::arg("reduces") = c.reduces, py::arg("rooted") = c.rooted,
                          py::arg("count") = c.count, py::arg("bytes") = c.bytes,
                          py::arg("algorithms") = names, py::arg("formulas") = formulas));
  }
  colls["send/recv"] = int(Coll::SendRecv);
  m.attr("DTYPES") = dtypes;
  m.attr("OPS") = ops;
  m.attr("ALGORITHMS") = algos;
  m.attr("COLLECTIVES") = colls;
  m.attr("TABLE") = table;

  m.def(
      "predict",
      [](int coll, int algo, double bytes, int size, double alpha, double beta, double gamma) {
        return predict(CostModel{alpha, beta, gamma}, Coll(coll), Algo(algo), bytes, size);
      },
      py::arg("coll"), py::arg("algo"), py::arg("bytes"), py::arg("size"), py::arg("alpha"),
      py::arg("beta"), py::arg("gamma"), "seconds the alpha-beta model predicts (algorithms/cost.h)");
  m.def(
      "choose",
      [](int coll, double bytes, int size, double alpha, double beta, double gamma) {
        return int(choose(CostModel{alpha, beta, gamma}, Coll(coll), bytes, size));
      },
      py::arg("coll"), py::arg("bytes"), py::arg("size"), py::arg("alpha"), py::arg("beta"),
      py::arg("gamma"), "the algorithm code the cost model picks (the cheapest; the first on ties)");
  m.def("tree_depth", &treeDepth, py::arg("size"));
  m.def("single_copy_from", &singleCopyFrom, py::arg("alpha"), py::arg("beta"), py::arg("copy_alpha"),
        py::arg("copy_beta"), "smallest send the shm transport sends single-copy (algorithms/cost.h)");
  m.def(
      "algo_override",
      [](const std::string& setting, int coll) { return int(algoOverride(setting, Coll(coll))); },
      py::arg("setting"), py::arg("coll"),
      "PYCOMM_ALGO's choice for a collective: 0 ring, 1 tree, 3 pairwise, 4 exchange, 2 left to the "
      "cost model");
  m.def(
      "tree",
      [](int rank, int size, int which) {
        TreeNode n = doubleTree(rank, size, which);
        return std::make_tuple(n.parent, n.child[0], n.child[1]);
      },
      py::arg("rank"), py::arg("size"), py::arg("which") = 0,
      "(parent, child0, child1) of `rank` in tree `which` of the double binary tree; -1 = none");

  m.def(
      "schedule_rounds",
      [](int coll, int algo, int size, size_t count, size_t esize, int root, size_t pieceBytes,
         bool inPlace) {
        // Plans with symbolic buffers (buffer id in the top bits: 1 input, 2 output,
        // 3 scratch), so that Python can replay the rounds on arrays (tests/cuda).
        const uintptr_t unit = uintptr_t(1) << 40;
        auto plans = [&](Plan& p, int r) {
          CollArgs a{Coll(coll), Algo(algo), size, reinterpret_cast<char*>(2 * unit),
                     reinterpret_cast<const char*>(1 * unit), reinterpret_cast<char*>(3 * unit),
                     count, esize, root};
          if (inPlace) {  // NCCL's in-place layouts
            if (Coll(coll) == Coll::ReduceScatter || Coll(coll) == Coll::Scatter)
              a.out = const_cast<char*>(a.in) + size_t(r) * count * esize;
            else if (Coll(coll) == Coll::AllGather || Coll(coll) == Coll::Gather)
              a.in = a.out + size_t(r) * count * esize;
            else if (Coll(coll) == Coll::AllToAll)
              throw std::invalid_argument("all_to_all has no in-place form");
            else
              a.in = a.out;
          }
          collectivePlan(p, r, a);
        };
        auto where = [&](const void* q) {
          uintptr_t v = reinterpret_cast<uintptr_t>(q);
          return std::make_tuple(int(v / unit), size_t(v % unit));
        };
        std::vector<Rounds> all = scheduleRounds(size, plans, pieceBytes);
        CollArgs shape{Coll(coll), Algo(algo), size, nullptr, nullptr, nullptr, count, esize, root};
        const size_t planScratch = collectiveScratch(shape);
        py::list ranks;
        for (int r = 0; r < size; ++r) {
          Plan p;
          plans(p, r);
          py::list copies, after, rounds;
          for (const LocalCopy& c : p.copies())
            copies.append(py::make_tuple(where(c.dst), where(c.src), c.bytes));
          for (const LocalCopy& c : p.copiesAfter())
            after.append(py::make_tuple(where(c.dst), where(c.src), c.bytes));
          for (const auto& round : all[r].rounds) {
            py::list ops;
            for (const RoundOp& op : round) {
              const Task& t = p.tasks()[op.task];
              ops.append(py::make_tuple(int(t.kind), t.peer, t.lane, where(t.src + op.offset),
                                        where(t.dst + op.offset), op.bytes, op.scratch,
                                        t.receivedFirst));
            }
            rounds.append(ops);
          }
          ranks.append(py::dict(py::arg("copies") = copies, py::arg("copies_after") = after,
                                py::arg("rounds") = rounds,
                                py::arg("scratch_bytes") = all[r].scratchBytes,
                                py::arg("plan_scratch_bytes") = planScratch));
        }
        return ranks;
      },
      py::arg("coll"), py::arg("algo"), py::arg("size"), py::arg("count"), py::arg("esize"),
      py::arg("root"), py::arg("piece_bytes"), py::arg("in_place") = false,
      "every rank's plan cut into bulk-synchronous rounds (algorithms/rounds.h), with "
      "buffers as (id, offset): 1 input, 2 output, 3 scratch; ops are (kind 0 send, 1 "
      "recv-copy, 2 recv-reduce; peer; lane; src; dst; bytes; scratch offset; recv-reduce: whether "
      "the received piece is the first operand); "
      "scratch_bytes: a round's reduction scratch; plan_scratch_bytes: the scratch buffer 3 "
      "the collective's row asks for.  all_to_all "
      "only with equal counts: rounds replay every rank's plan, which needs every rank's counts");
}
