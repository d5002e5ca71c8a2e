// The mock NCCL (nccl.h here), a CPU version of pycomm::cuda::reduce, and a driver that
// runs csrc/cuda/nccl.cu's NcclComm with one thread per rank and checks exact results.
//
//   mock_nccl  -> prints "checked N cases" and exits 0, or prints the failures and exits 1
//
// The CUDA reduction kernels (csrc/cuda/reduce.cu) cannot run here: the mock's reduce is
// pycomm's CPU one (csrc/reduce.cpp), with the same dtypes and ops.  So the dtype and op
// cases below check what nccl.cu does with them (element sizes, pieces, scratch, the
// order of reductions), and the kernels are left to the GPU tests (tests/cuda/).
#include "nccl.h"

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <type_traits>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common.h"
#include "cuda/nccl.cuh"
#include "cuda/reduce.cuh"
#include "reduce.h"

// ------------------------------------------------------------------------- mock NCCL

struct World {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<int, int>, std::deque<std::vector<char>>> inbox;  // (from, to) -> messages
};

struct MockNcclComm {
  World* world;
  int rank;
  int nranks;
  bool stuck;
};

namespace {
std::mutex worldsMu;
std::map<std::string, World*> worlds;

struct Op {
  bool send;
  char* buf;
  size_t bytes;
  int peer;
  ncclComm_t comm;
};
thread_local int groupDepth = 0;
thread_local std::vector<Op> pending;

void flush() {
  for (const Op& o : pending)
    if (o.send) {
      World* w = o.comm->world;
      std::lock_guard<std::mutex> lock(w->mu);
      w->inbox[{o.comm->rank, o.peer}].emplace_back(o.buf, o.buf + o.bytes);
      w->cv.notify_all();
    }
  for (const Op& o : pending)
    if (!o.send) {
      World* w = o.comm->world;
      std::unique_lock<std::mutex> lock(w->mu);
      auto& q = w->inbox[{o.peer, o.comm->rank}];
      w->cv.wait(lock, [&] { return !q.empty(); });
      if (q.front().size() != o.bytes) {
        std::fprintf(stderr, "size mismatch: rank %d receives %zu B from %d, which sent %zu B\n",
                     o.comm->rank, o.bytes, o.peer, q.front().size());
        std::abort();
      }
      std::memcpy(o.buf, q.front().data(), o.bytes);
      q.pop_front();
    }
  pending.clear();
}
}  // namespace

const char* ncclGetErrorString(ncclResult_t) { return "mock NCCL error"; }
const char* ncclGetLastError(ncclComm_t) { return ""; }
std::atomic<int> aborts{0};
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
  std::lock_guard<std::mutex> lock(worldsMu);
  World*& w = worlds[std::string(id.internal)];
  if (!w) w = new World();
  *comm = new MockNcclComm{w, rank, nranks, std::strncmp(id.internal, "stuck", 5) == 0};
  return ncclSuccess;
}
ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, ncclConfig_t*) {
  return ncclCommInitRank(comm, nranks, id, rank);
}
ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t* state) {
  *state = comm->stuck ? ncclInProgress : ncclSuccess;
  return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) {
  ++aborts;
  return ncclCommDestroy(comm);
}
int mockGroupDepth() { return groupDepth; }
int mockAborts() { return aborts; }
ncclResult_t ncclGroupStart() {
  ++groupDepth;
  return ncclSuccess;
}
ncclResult_t ncclGroupEnd() {
  if (--groupDepth == 0) flush();
  return ncclSuccess;
}
ncclResult_t ncclSend(const void* buf, size_t count, ncclDataType_t, int peer, ncclComm_t comm, void*) {
  if (peer < 0 || peer >= comm->nranks) return ncclInvalidArgument;
  pending.push_back({true, const_cast<char*>(static_cast<const char*>(buf)), count, peer, comm});
  if (groupDepth == 0) flush();
  return ncclSuccess;
}
ncclResult_t ncclRecv(void* buf, size_t count, ncclDataType_t, int peer, ncclComm_t comm, void*) {
  if (peer < 0 || peer >= comm->nranks) return ncclInvalidArgument;
  pending.push_back({false, static_cast<char*>(buf), count, peer, comm});
  if (groupDepth == 0) flush();
  return ncclSuccess;
}

// ------------------------------------------------------------------------- CPU reduce

namespace pycomm::cuda {
void reduce(void* out, const void* const* srcs, int n, size_t count, DType dtype, RedOp op, cudaStream_t) {
  if (n == 1) {
    std::memmove(out, srcs[0], count * dtypeSize(dtype));
    return;
  }
  reduceInto(out, srcs[0], srcs[1], count, dtype, op);  // in source order, as the kernels
  for (int r = 2; r < n; ++r) reduceInto(out, out, srcs[r], count, dtype, op);
}
}  // namespace pycomm::cuda

// ------------------------------------------------------------------------- driver

using namespace pycomm;

namespace {

int64_t value(int rank, size_t i) { return int64_t((i * 7 + rank * 3) % 17) - 8; }

// Rank `rank`'s element i as a T (bool: 0 or 1, stored in a byte).
template <typename T>
T element(DType d, int rank, size_t i) {
  int64_t v = value(rank, i);
  return d == DType::Bool ? T(v & 1) : T(v);
}

// a op b as pycomm defines it (csrc/reduce.h): bool's sum and max are "or", its prod and
// min "and"; avg is reduced as a sum.  Integers wrap, so any reduction order agrees.
template <typename T>
T fold(DType d, RedOp op, T a, T b) {
  const bool logical = d == DType::Bool;
  if constexpr (std::is_integral_v<T>) {
    switch (op) {
      case RedOp::Band: return T(a & b);
      case RedOp::Bor: return T(a | b);
      case RedOp::Bxor: return T(a ^ b);
      default: break;
    }
    if (logical && (op == RedOp::Sum || op == RedOp::Avg)) return T(a | b);
    if (logical && op == RedOp::Prod) return T(a & b);
  }
  switch (op) {
    case RedOp::Sum:
    case RedOp::Avg: return T(a + b);
    case RedOp::Prod: return T(a * b);
    case RedOp::Min: return b < a ? b : a;
    case RedOp::Max: return a < b ? b : a;
    default: throw std::logic_error("fold: no such op");
  }
}

struct Case {
  int size;
  Coll coll;
  Algo algo;
  size_t count;
  size_t piece;
  bool inPlace;
  int root;
  DType dtype = DType::I64;
  RedOp op = RedOp::Sum;
};

std::string show(const Case& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "size=%d coll=%s algo=%s count=%zu piece=%zu in_place=%d root=%d %s %s",
                c.size, collName(c.coll), algoName(c.algo), c.count, c.piece, int(c.inPlace), c.root,
                dtypeName(c.dtype), redopName(c.op));
  return buf;
}

int worldId = 0;

// Runs `body(rank, comm)` on one thread per rank of a new world; returns the ranks' errors.
std::vector<std::string> onRanks(int size, size_t piece,
                                 const std::function<void(int, cuda::NcclComm&)>& body) {
  ncclUniqueId id{};
  std::snprintf(id.internal, sizeof id.internal, "world-%d", worldId++);
  std::vector<std::string> errors(size);
  std::vector<std::thread> threads;
  for (int r = 0; r < size; ++r)
    threads.emplace_back([&, r] {
      try {
        cuda::NcclComm comm(0, r, size, id, piece);
        body(r, comm);
      } catch (const std::exception& e) {
        errors[r] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

// One collective through NcclComm::run; returns the number of ranks with a wrong result.
template <typename T>
int runCase(const Case& c) {
  const int size = c.size;
  const size_t count = c.count;
  const bool splitIn = c.coll == Coll::ReduceScatter || c.coll == Coll::Scatter;
  const bool splitOut = c.coll == Coll::AllGather || c.coll == Coll::Gather;
  const size_t nIn = splitIn ? count * size : count, nOut = splitOut ? count * size : count;
  const T untouched = T(99);  // where the collective must not write
  std::vector<std::vector<T>> outs(size);
  auto errors = onRanks(size, c.piece, [&](int r, cuda::NcclComm& comm) {
    std::vector<T> in(nIn), out(std::max(nOut, nIn), untouched);
    for (size_t i = 0; i < nIn; ++i) in[i] = element<T>(c.dtype, r, i);
    const T* src = in.data();
    T* dst = out.data();
    if (c.inPlace || c.coll == Coll::Broadcast) {  // broadcast always works in place
      if (splitIn) {  // output = input's own chunk
        out = in;
        dst = out.data() + r * count;
        src = out.data();
      } else if (splitOut) {  // input = output's own chunk
        std::copy(in.begin(), in.end(), out.begin() + r * count);
        src = out.data() + r * count;
      } else {
        std::copy(in.begin(), in.end(), out.begin());
        src = out.data();
      }
    }
    std::vector<char> scratch(comm.scratchBytes(c.coll, c.algo, count, c.dtype, c.root) + 1);
    comm.run(c.coll, c.algo, dst, src, scratch.data(), count, c.dtype, collective(c.coll).reduces ? c.op : RedOp::None,
             c.root, nullptr);
    outs[r] = out;  // the whole buffer: what must not change is checked too
  });
  int failures = 0;
  for (int r = 0; r < size; ++r) {
    // What rank r's buffer must hold: its initial state, with the result laid over it.
    std::vector<T> want(std::max(nOut, nIn), untouched);
    size_t at = 0;  // where the result starts
    if (c.inPlace || c.coll == Coll::Broadcast) {
      if (splitIn) {
        for (size_t i = 0; i < nIn; ++i) want[i] = element<T>(c.dtype, r, i);
        at = r * count;
      } else if (splitOut) {
        for (size_t i = 0; i < count; ++i) want[r * count + i] = element<T>(c.dtype, r, i);
      } else {
        for (size_t i = 0; i < count; ++i) want[i] = element<T>(c.dtype, r, i);
      }
    }
    const bool hasResult = !(c.coll == Coll::Reduce || c.coll == Coll::Gather) || r == c.root;
    for (size_t i = 0; hasResult && i < nOut; ++i) {
      T w{};
      if (c.coll == Coll::AllReduce || c.coll == Coll::Reduce || c.coll == Coll::ReduceScatter) {
        const size_t k = c.coll == Coll::ReduceScatter ? r * count + i : i;
        w = element<T>(c.dtype, 0, k);
        for (int q = 1; q < size; ++q) w = fold(c.dtype, c.op, w, element<T>(c.dtype, q, k));
      } else if (splitOut) {
        w = element<T>(c.dtype, int(i / count), i % count);
      } else if (c.coll == Coll::Scatter) {
        w = element<T>(c.dtype, c.root, r * count + i);
      } else {
        w = element<T>(c.dtype, c.root, i);
      }
      want[at + i] = w;
    }
    if (!errors[r].empty() || outs[r] != want) {
      ++failures;
      std::printf("FAIL %s rank=%d %s\n", show(c).c_str(), r, errors[r].c_str());
    }
  }
  return failures;
}

int runAny(const Case& c) {
  switch (c.dtype) {
    case DType::I64: return runCase<int64_t>(c);
    case DType::I32: return runCase<int32_t>(c);
    case DType::I16: return runCase<int16_t>(c);
    case DType::I8: return runCase<int8_t>(c);
    case DType::U8:
    case DType::Bool: return runCase<uint8_t>(c);
    case DType::F32: return runCase<float>(c);
    case DType::F64: return runCase<double>(c);
    default: throw std::logic_error("no host type for this dtype");
  }
}

// all_to_all through NcclComm::allToAll, with counts[i][j] elements from i to j.
int runAllToAll(int size, const std::vector<std::vector<size_t>>& counts, size_t piece) {
  std::vector<std::vector<int64_t>> outs(size);
  auto start = [&](int q, int j) {  // where rank q's block for rank j starts in q's input
    size_t s = 0;
    for (int k = 0; k < j; ++k) s += counts[q][k];
    return s;
  };
  auto errors = onRanks(size, piece, [&](int r, cuda::NcclComm& comm) {
    std::vector<size_t> sendBytes(size), recvBytes(size);
    size_t nIn = 0, nOut = 0;
    for (int j = 0; j < size; ++j) {
      sendBytes[j] = counts[r][j] * 8, nIn += counts[r][j];
      recvBytes[j] = counts[j][r] * 8, nOut += counts[j][r];
    }
    std::vector<int64_t> in(nIn), out(nOut, 99);
    for (size_t i = 0; i < nIn; ++i) in[i] = value(r, i);
    comm.allToAll(out.data(), in.data(), sendBytes.data(), recvBytes.data(), nullptr);
    outs[r] = out;
  });
  int failures = 0;
  for (int r = 0; r < size; ++r) {
    std::vector<int64_t> want;
    for (int q = 0; q < size; ++q)
      for (size_t i = 0; i < counts[q][r]; ++i) want.push_back(value(q, start(q, r) + i));
    if (!errors[r].empty() || outs[r] != want) {
      ++failures;
      std::printf("FAIL all_to_all size=%d rank=%d %s\n", size, r, errors[r].c_str());
    }
  }
  return failures;
}

// The transport's failure paths: group depth after an error, the caller's device, a peer
// that never connects (polled against the timeout), and abort() while a call is polling.
int transportChecks(int& cases) {
  int failures = 0;
  auto expect = [&](bool ok, const std::string& what) {
    ++cases;
    if (!ok) {
      ++failures;
      std::printf("FAIL %s\n", what.c_str());
    }
  };
  {  // an error inside a group (a send to rank 5 of 2) closes the group and keeps the comm usable
    auto errors = onRanks(2, 16, [&](int r, cuda::NcclComm& comm) {
      int64_t x = r, y = -1;
      int isSend[2] = {1, 0};
      void* bufs[2] = {&x, &y};
      size_t bytes[2] = {8, 8};
      int bad[2] = {5, 5};
      std::string err;
      try {
        comm.p2p(2, isSend, bufs, bytes, bad, nullptr);
      } catch (const std::exception& e) {
        err = e.what();
      }
      if (err.find("ncclSend") == std::string::npos) throw std::runtime_error("no error for peer 5: " + err);
      if (mockGroupDepth() != 0) throw std::runtime_error("group depth left at " + std::to_string(mockGroupDepth()));
      int peers[2] = {1 - r, 1 - r};
      comm.p2p(2, isSend, bufs, bytes, peers, nullptr);
      if (y != 1 - r) throw std::runtime_error("p2p after the error received " + std::to_string(y));
    });
    for (int r = 0; r < 2; ++r) expect(errors[r].empty(), "group depth after an error, rank " + std::to_string(r) + ": " + errors[r]);
  }
  {  // the caller's current device survives a call that selects the comm's device
    ncclUniqueId id{};
    std::snprintf(id.internal, sizeof id.internal, "device-check");
    cudaSetDevice(3);
    {
      cuda::NcclComm comm(1, 0, 1, id, 16);
      int64_t x = 1, y = 0;
      comm.run(Coll::AllReduce, Algo::Ring, &y, &x, nullptr, 1, DType::I64, RedOp::Sum, -1, nullptr);
    }
    int d = -1;
    cudaGetDevice(&d);
    expect(d == 3, "the caller's device is " + std::to_string(d) + " after the calls, not 3");
  }
  {  // a peer that never connects: the call fails after the timeout instead of hanging
    ncclUniqueId id{};
    std::snprintf(id.internal, sizeof id.internal, "stuck-1");
    cuda::NcclComm comm(0, 0, 2, id, 16, 0.2);
    expect(!comm.ready(), "ready() of a comm whose peer never connects");
    auto start = std::chrono::steady_clock::now();
    std::string err;
    try {
      int64_t x = 1;
      comm.run(Coll::AllReduce, Algo::Ring, &x, &x, nullptr, 1, DType::I64, RedOp::Sum, -1, nullptr);
    } catch (const std::exception& e) {
      err = e.what();
    }
    double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    expect(err.find("did not finish connecting") != std::string::npos && s < 5,
           "stuck peer: '" + err + "' after " + std::to_string(s) + " s");
  }
  {  // abort() from another thread ends a call that is polling, and abort twice is harmless
    ncclUniqueId id{};
    std::snprintf(id.internal, sizeof id.internal, "stuck-2");
    cuda::NcclComm comm(0, 0, 2, id, 16);  // no timeout: only abort() can end the wait
    int before = mockAborts();
    std::string err;
    std::thread caller([&] {
      try {
        int64_t x = 1;
        comm.run(Coll::AllReduce, Algo::Ring, &x, &x, nullptr, 1, DType::I64, RedOp::Sum, -1, nullptr);
      } catch (const std::exception& e) {
        err = e.what();
      }
    });
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    comm.abort();
    comm.abort();
    caller.join();
    expect(err.find("aborted") != std::string::npos && mockAborts() == before + 1,
           "abort during a call: '" + err + "', " + std::to_string(mockAborts() - before) + " aborts");
  }
  return failures;
}

}  // namespace

int main() {
  int cases = 0, failures = 0;
  const Coll colls[] = {Coll::AllReduce, Coll::ReduceScatter, Coll::AllGather, Coll::Broadcast,
                        Coll::Reduce, Coll::Gather, Coll::Scatter};
  for (int size = 1; size <= 5; ++size)
    for (Coll coll : colls)
      for (Algo algo : {Algo::Ring, Algo::Tree})
        for (size_t count : {size_t(0), size_t(1), size_t(7), size_t(1000)})
          for (size_t piece : {size_t(16), size_t(1) << 20})
            for (bool inPlace : {false, true}) {
              // The newer rooted collectives with every root, the others with the last.
              const bool everyRoot = coll == Coll::Reduce || coll == Coll::Gather || coll == Coll::Scatter;
              for (int root = everyRoot ? 0 : size - 1; root < size; ++root) {
                ++cases;
                failures += runAny(Case{size, coll, algo, count, piece, inPlace, root});
              }
            }
  // Every reducing dtype and op through all-reduce and reduce (bitwise ops: integers and
  // bool only).
  for (DType dtype : {DType::U8, DType::I8, DType::I16, DType::I32, DType::I64, DType::F32,
                      DType::F64, DType::Bool})
    for (RedOp op : {RedOp::Sum, RedOp::Prod, RedOp::Min, RedOp::Max, RedOp::Avg, RedOp::Band,
                     RedOp::Bor, RedOp::Bxor}) {
      const bool floating = dtype == DType::F32 || dtype == DType::F64;
      if (floating && (op == RedOp::Band || op == RedOp::Bor || op == RedOp::Bxor)) continue;
      for (int size : {1, 3, 4})
        for (Coll coll : {Coll::AllReduce, Coll::Reduce})
          for (Algo algo : {Algo::Ring, Algo::Tree})
            for (size_t count : {size_t(1), size_t(37)}) {
              ++cases;
              failures += runAny(Case{size, coll, algo, count, 16, false, size / 2, dtype, op});
            }
    }
  // all_to_all with uneven counts, zeros included, and with equal ones.
  for (int size = 1; size <= 5; ++size)
    for (int pattern = 0; pattern < 4; ++pattern)
      for (size_t piece : {size_t(16), size_t(1) << 20}) {
        std::vector<std::vector<size_t>> counts(size, std::vector<size_t>(size));
        for (int i = 0; i < size; ++i)
          for (int j = 0; j < size; ++j)
            counts[i][j] = pattern == 0 ? 5 : size_t(((i * 3 + j * 5 + pattern) % 3) * ((i + 2 * j) % 7)) * (pattern == 3 ? 100 : 1);
        ++cases;
        failures += runAllToAll(size, counts, piece);
      }
  // run() refuses all_to_all and says what to call instead.
  {
    ++cases;
    auto errors = onRanks(2, 16, [&](int, cuda::NcclComm& comm) {
      int64_t buf[2] = {0, 0};
      comm.run(Coll::AllToAll, Algo::Pairwise, buf, buf, nullptr, 1, DType::I64, RedOp::None, -1, nullptr);
    });
    for (const std::string& e : errors)
      if (e.find("pycomm_nccl_all_to_all") == std::string::npos) {
        ++failures;
        std::printf("FAIL run(all_to_all) did not point to pycomm_nccl_all_to_all: '%s'\n", e.c_str());
      }
  }
  failures += transportChecks(cases);
  std::printf("checked %d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
