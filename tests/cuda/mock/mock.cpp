// The mock NCCL (nccl.h here), a CPU version of pycomm::cuda::reduce, and a driver that
// runs csrc/cuda/nccl.cu's NcclComm with one thread per rank and checks exact results.
//
//   mock_nccl  -> prints "checked N cases" and exits 0, or prints the failures and exits 1
#include "nccl.h"

#include <condition_variable>
#include <cstdint>
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

// ------------------------------------------------------------------------- mock NCCL

struct World {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<int, int>, std::deque<std::vector<char>>> inbox;  // (from, to) -> messages
};

struct MockNcclComm {
  World* world;
  int rank;
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
ncclResult_t ncclCommInitRank(ncclComm_t* comm, int, ncclUniqueId id, int rank) {
  std::lock_guard<std::mutex> lock(worldsMu);
  World*& w = worlds[std::string(id.internal)];
  if (!w) w = new World();
  *comm = new MockNcclComm{w, rank};
  return ncclSuccess;
}
ncclResult_t ncclCommDestroy(ncclComm_t comm) {
  delete comm;
  return ncclSuccess;
}
ncclResult_t ncclCommAbort(ncclComm_t comm) { return ncclCommDestroy(comm); }
ncclResult_t ncclGroupStart() {
  ++groupDepth;
  return ncclSuccess;
}
ncclResult_t ncclGroupEnd() {
  if (--groupDepth == 0) flush();
  return ncclSuccess;
}
ncclResult_t ncclSend(const void* buf, size_t count, ncclDataType_t, int peer, ncclComm_t comm, void*) {
  pending.push_back({true, const_cast<char*>(static_cast<const char*>(buf)), count, peer, comm});
  if (groupDepth == 0) flush();
  return ncclSuccess;
}
ncclResult_t ncclRecv(void* buf, size_t count, ncclDataType_t, int peer, ncclComm_t comm, void*) {
  pending.push_back({false, static_cast<char*>(buf), count, peer, comm});
  if (groupDepth == 0) flush();
  return ncclSuccess;
}

// ------------------------------------------------------------------------- CPU reduce

namespace pycomm::cuda {
template <typename T>
static void combine(T* out, const void* const* srcs, int n, size_t count, RedOp op) {
  for (size_t i = 0; i < count; ++i) {
    T acc = static_cast<const T*>(srcs[0])[i];
    for (int r = 1; r < n; ++r) {
      T v = static_cast<const T*>(srcs[r])[i];
      acc = op == RedOp::Sum ? acc + v : op == RedOp::Prod ? acc * v : op == RedOp::Min ? (v < acc ? v : acc)
                                                                                        : (acc < v ? v : acc);
    }
    out[i] = acc;
  }
}
void reduce(void* out, const void* const* srcs, int n, size_t count, DType dtype, RedOp op, cudaStream_t) {
  if (dtype == DType::I64) return combine(static_cast<int64_t*>(out), srcs, n, count, op);
  if (dtype == DType::F64) return combine(static_cast<double*>(out), srcs, n, count, op);
  throw std::runtime_error("mock reduce: int64 and float64 only");
}
}  // namespace pycomm::cuda

// ------------------------------------------------------------------------- driver

using namespace pycomm;

static int64_t value(int rank, size_t i) { return int64_t((i * 7 + rank * 3) % 17) - 8; }

int main() {
  int cases = 0, failures = 0, worldId = 0;
  for (int size = 1; size <= 5; ++size)
    for (int coll = 0; coll < 4; ++coll)
      for (int algo = 0; algo < 2; ++algo)
        for (size_t count : {size_t(0), size_t(1), size_t(7), size_t(1000)})
          for (size_t piece : {size_t(16), size_t(1) << 20})
            for (bool inPlace : {false, true}) {
              ncclUniqueId id{};
              std::snprintf(id.internal, sizeof id.internal, "world-%d", worldId++);
              const int root = size - 1;
              const size_t nIn = coll == 1 ? count * size : count;
              const size_t nOut = coll == 2 ? count * size : count;
              std::vector<std::vector<int64_t>> outs(size);
              std::vector<std::string> errors(size);
              std::vector<std::thread> threads;
              for (int r = 0; r < size; ++r)
                threads.emplace_back([&, r] {
                  try {
                    cuda::NcclComm comm(0, r, size, id, piece);
                    std::vector<int64_t> in(nIn), out(std::max(nOut, nIn));
                    for (size_t i = 0; i < nIn; ++i) in[i] = value(r, i);
                    const int64_t* src = in.data();
                    int64_t* dst = out.data();
                    if (inPlace || coll == 3) {  // broadcast always works in place
                      if (coll == 1) {           // output = input's own chunk
                        out = in;
                        dst = out.data() + r * count;
                        src = out.data();
                      } else if (coll == 2) {    // input = output's own chunk
                        std::copy(in.begin(), in.end(), out.begin() + r * count);
                        src = out.data() + r * count;
                      } else {
                        std::copy(in.begin(), in.end(), out.begin());
                        src = out.data();
                      }
                    }
                    std::vector<char> scratch(
                        comm.scratchBytes(Coll(coll), Algo(algo), count, DType::I64, root) + 1);
                    comm.run(Coll(coll), Algo(algo), dst, src, scratch.data(), count, DType::I64,
                             coll <= 1 ? RedOp::Sum : RedOp::None, root, nullptr);
                    outs[r].assign(dst, dst + nOut);
                  } catch (const std::exception& e) {
                    errors[r] = e.what();
                  }
                });
              for (auto& t : threads) t.join();
              ++cases;
              for (int r = 0; r < size; ++r) {
                bool ok = errors[r].empty();
                for (size_t i = 0; ok && i < nOut; ++i) {
                  int64_t want = 0;
                  if (coll == 0) {
                    for (int q = 0; q < size; ++q) want += value(q, i);
                  } else if (coll == 1) {
                    for (int q = 0; q < size; ++q) want += value(q, r * count + i);
                  } else if (coll == 2) {
                    want = value(int(i / count), i % count);
                  } else {
                    want = value(root, i);
                  }
                  ok = outs[r][i] == want;
                }
                if (!ok) {
                  ++failures;
                  std::printf("FAIL size=%d coll=%d algo=%d count=%zu piece=%zu in_place=%d rank=%d %s\n",
                              size, coll, algo, count, piece, int(inPlace), r, errors[r].c_str());
                }
              }
            }
  std::printf("checked %d cases, %d failures\n", cases, failures);
  return failures ? 1 : 0;
}
