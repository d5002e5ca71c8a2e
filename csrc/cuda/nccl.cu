// NCCL point-to-point transport (nccl.cuh).
//
// Why not call ncclAllReduce?  Because pycomm's point is its own algorithms: the same
// ring and double-binary-tree plans the shared-memory transport runs, here carried by
// NCCL's point-to-point engine across GPUs and hosts, with pycomm's cost model choosing.
// Each round is one ncclGroupStart/End (so its sends and receives progress together and
// cannot deadlock each other); a received piece that must be reduced lands in scratch
// and our reduction kernel combines it after the group, in stream order.
#include "cuda/nccl.cuh"

#include <string>
#include <utility>

#include "cuda/check.h"
#include "cuda/reduce.cuh"

namespace pycomm::cuda {

namespace {

void check(ncclResult_t r, const char* what, ncclComm_t comm) {
  if (r == ncclSuccess || r == ncclInProgress) return;
  std::string msg = std::string(what) + ": " + ncclGetErrorString(r);
  const char* last = ncclGetLastError(comm);
  if (last && *last) msg += " (" + std::string(last) + ")";
  fail(msg);
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

NcclComm::NcclComm(int device, int rank, int size, const ncclUniqueId& id, size_t pieceBytes)
    : device_(device), rank_(rank), size_(size), pieceBytes_(pieceBytes) {
  if (pieceBytes_ == 0 || pieceBytes_ % 16 != 0)
    fail("NCCL piece size must be a positive multiple of 16 bytes, not " + std::to_string(pieceBytes));
  useDevice(device_);
  check(ncclCommInitRank(&comm_, size, id, rank), "ncclCommInitRank", nullptr);
}

NcclComm::~NcclComm() {
  if (comm_) {
    cudaSetDevice(device_);
    ncclCommDestroy(comm_);
  }
}

void NcclComm::abort() {
  if (comm_) {
    cudaSetDevice(device_);
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
}

namespace {
// Rounds replay every rank's plan built from this rank's arguments (rounds.h), which
// all_to_all's per-rank counts are not.
void refuseAllToAll(Coll coll) {
  if (coll == Coll::AllToAll)
    fail("all_to_all does not run as rounds of pycomm_nccl_run (each rank's plan depends on its "
         "own counts); call pycomm_nccl_all_to_all");
}
}  // namespace

const Rounds& NcclComm::rounds(const CollArgs& a) {
  refuseAllToAll(a.coll);
  Key key{int(a.coll), int(a.algo), a.count, a.esize, a.root};
  auto it = cache_.find(key);
  if (it != cache_.end()) return *it->second;
  CollArgs shape = a;  // any rank's plan, built on this rank's pointers
  std::vector<Rounds> all =
      scheduleRounds(size_, [&](Plan& p, int r) { collectivePlan(p, r, shape); }, pieceBytes_);
  auto mine = std::make_unique<Rounds>(std::move(all[rank_]));
  return *(cache_[key] = std::move(mine));
}

size_t NcclComm::scratchBytes(Coll coll, Algo algo, size_t count, DType dtype, int root) {
  std::lock_guard<std::mutex> lock(mu_);
  refuseAllToAll(coll);
  CollArgs a{coll, algo, size_, nullptr, nullptr, nullptr, count, dtypeSize(dtype), root};
  return align256(collectiveScratch(a)) + rounds(a).scratchBytes;
}

void NcclComm::run(Coll coll, Algo algo, void* out, const void* in, void* scratch, size_t count,
                   DType dtype, RedOp op, int root, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  refuseAllToAll(coll);
  if (!comm_) fail("this NCCL communicator was aborted; create a new process group");
  useDevice(device_);
  const size_t es = dtypeSize(dtype);
  CollArgs a{coll, algo, size_, static_cast<char*>(out), static_cast<const char*>(in),
             static_cast<char*>(scratch), count, es, root};
  Plan plan;
  collectivePlan(plan, rank_, a);
  const Rounds& rs = rounds(a);
  char* roundScratch = static_cast<char*>(scratch) + align256(collectiveScratch(a));

  for (const LocalCopy& c : plan.copies())
    PYCOMM_CUDA_CHECK(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyDeviceToDevice, stream));
  for (const auto& round : rs.rounds) {
    check(ncclGroupStart(), "ncclGroupStart", comm_);
    for (const RoundOp& o : round) {
      const Task& t = plan.tasks()[o.task];
      if (t.kind == Task::Send)
        check(ncclSend(t.src + o.offset, o.bytes, ncclUint8, t.peer, comm_, stream), "ncclSend", comm_);
      else
        check(ncclRecv(t.kind == Task::RecvCopy ? t.dst + o.offset : roundScratch + o.scratch,
                       o.bytes, ncclUint8, t.peer, comm_, stream),
              "ncclRecv", comm_);
    }
    check(ncclGroupEnd(), "ncclGroupEnd", comm_);
    for (const RoundOp& o : round) {
      const Task& t = plan.tasks()[o.task];
      if (t.kind != Task::RecvReduce) continue;
      const void* srcs[2] = {t.src + o.offset, roundScratch + o.scratch};
      if (t.receivedFirst) std::swap(srcs[0], srcs[1]);  // the order both partners use (plan.h)
      reduce(t.dst + o.offset, srcs, 2, o.bytes / es, dtype, op, stream);
    }
  }
  for (const LocalCopy& c : plan.copiesAfter())
    PYCOMM_CUDA_CHECK(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyDeviceToDevice, stream));
}

void NcclComm::p2p(int n, const int* isSend, void* const* bufs, const size_t* bytes, const int* peers,
                   cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!comm_) fail("this NCCL communicator was aborted; create a new process group");
  useDevice(device_);
  check(ncclGroupStart(), "ncclGroupStart", comm_);
  for (int i = 0; i < n; ++i) {
    if (isSend[i])
      check(ncclSend(bufs[i], bytes[i], ncclUint8, peers[i], comm_, stream), "ncclSend", comm_);
    else
      check(ncclRecv(bufs[i], bytes[i], ncclUint8, peers[i], comm_, stream), "ncclRecv", comm_);
  }
  check(ncclGroupEnd(), "ncclGroupEnd", comm_);
}

void NcclComm::allToAll(void* out, const void* in, const size_t* sendBytes,
                        const size_t* recvBytes, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!comm_) fail("this NCCL communicator was aborted; create a new process group");
  useDevice(device_);
  // The pairwise plan with one-byte elements: counts are bytes.  It skips empty blocks on
  // both sides and makes the own block a local copy.
  CollArgs a{Coll::AllToAll, Algo::Pairwise, size_, static_cast<char*>(out),
             static_cast<const char*>(in), nullptr, 0, 1, -1, sendBytes, recvBytes};
  Plan plan;
  collectivePlan(plan, rank_, a);
  for (const LocalCopy& c : plan.copies())
    PYCOMM_CUDA_CHECK(cudaMemcpyAsync(c.dst, c.src, c.bytes, cudaMemcpyDeviceToDevice, stream));
  // One group: NCCL progresses all of a group's messages together, so the order of peers
  // cannot deadlock (it follows the plan: rank+s, rank-s at step s).
  check(ncclGroupStart(), "ncclGroupStart", comm_);
  for (const Task& t : plan.tasks()) {
    if (t.kind == Task::Send)
      check(ncclSend(t.src, t.bytes, ncclUint8, t.peer, comm_, stream), "ncclSend", comm_);
    else
      check(ncclRecv(t.dst, t.bytes, ncclUint8, t.peer, comm_, stream), "ncclRecv", comm_);
  }
  check(ncclGroupEnd(), "ncclGroupEnd", comm_);
}

}  // namespace pycomm::cuda
