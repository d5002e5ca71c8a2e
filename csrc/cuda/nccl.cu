// NCCL point-to-point transport (nccl.cuh).
//
// Why not call ncclAllReduce?  Because pycomm's point is its own algorithms: the same
// ring and double-binary-tree plans the shared-memory transport runs, here carried by
// NCCL's point-to-point engine across GPUs and hosts, with pycomm's cost model choosing.
// Each round is one ncclGroupStart/End (so its sends and receives progress together and
// cannot deadlock each other); a received piece that must be reduced lands in scratch
// and our reduction kernel combines it after the group, in stream order.
#include "cuda/nccl.cuh"

#include <chrono>
#include <string>
#include <thread>
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

// Closes a group on every path out of the scope that opened it: an exception between
// ncclGroupStart and ncclGroupEnd would otherwise leave this thread's group depth raised,
// and every later NCCL call on the thread would silently join the broken group.
class GroupGuard {
 public:
  explicit GroupGuard(ncclComm_t comm) { check(ncclGroupStart(), "ncclGroupStart", comm); }
  ~GroupGuard() {
    if (open_) ncclGroupEnd();
  }
  ncclResult_t end() {
    open_ = false;
    return ncclGroupEnd();
  }
  GroupGuard(const GroupGuard&) = delete;
  GroupGuard& operator=(const GroupGuard&) = delete;

 private:
  bool open_ = true;
};

NcclComm::NcclComm(int device, int rank, int size, const ncclUniqueId& id, size_t pieceBytes,
                   double timeoutSeconds)
    : device_(device), rank_(rank), size_(size), timeoutSeconds_(timeoutSeconds), pieceBytes_(pieceBytes) {
  if (pieceBytes_ == 0 || pieceBytes_ % 16 != 0)
    fail("NCCL piece size must be a positive multiple of 16 bytes, not " + std::to_string(pieceBytes));
  DeviceGuard dev(device_);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  check(ncclCommInitRankConfig(&comm_, size, id, rank, &config), "ncclCommInitRankConfig", nullptr);
}

NcclComm::~NcclComm() {
  std::lock_guard<std::mutex> lock(mu_);
  if (comm_) {
    DeviceGuard dev(device_, /*quiet=*/true);
    ncclCommDestroy(comm_);
    comm_ = nullptr;
  }
}

void NcclComm::abort() {
  aborting_ = true;  // a settle() loop holding mu_ sees this and returns
  std::lock_guard<std::mutex> lock(mu_);
  if (comm_) {
    DeviceGuard dev(device_);
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }
}

void NcclComm::requireLive() const {
  if (!comm_ || aborting_) fail("this NCCL communicator was aborted; create a new process group");
}

bool NcclComm::ready() {
  std::lock_guard<std::mutex> lock(mu_);
  requireLive();
  ncclResult_t state = ncclSuccess;
  check(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError", comm_);
  if (state == ncclInProgress) return false;
  check(state, "NCCL initialisation", comm_);
  return true;
}

void NcclComm::settle(const char* what) {
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    if (aborting_) fail(std::string(what) + ": the NCCL communicator was aborted");
    ncclResult_t state = ncclSuccess;
    check(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError", comm_);
    if (state != ncclInProgress) {
      check(state, what, comm_);
      return;
    }
    const double waited =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (timeoutSeconds_ > 0 && waited > timeoutSeconds_)
      fail(std::string(what) + ": NCCL did not finish connecting to the peers within " +
           std::to_string(timeoutSeconds_) + " s (a peer is dead or has not made this call)");
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
}

void NcclComm::endGroup() { settle("ncclGroupEnd"); }

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
  requireLive();
  settle("NCCL initialisation");
  DeviceGuard dev(device_);
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
    GroupGuard group(comm_);
    for (const RoundOp& o : round) {
      const Task& t = plan.tasks()[o.task];
      if (t.kind == Task::Send)
        check(ncclSend(t.src + o.offset, o.bytes, ncclUint8, t.peer, comm_, stream), "ncclSend", comm_);
      else
        check(ncclRecv(t.kind == Task::RecvCopy ? t.dst + o.offset : roundScratch + o.scratch,
                       o.bytes, ncclUint8, t.peer, comm_, stream),
              "ncclRecv", comm_);
    }
    check(group.end(), "ncclGroupEnd", comm_);
    endGroup();
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
  requireLive();
  settle("NCCL initialisation");
  DeviceGuard dev(device_);
  GroupGuard group(comm_);
  for (int i = 0; i < n; ++i) {
    if (isSend[i])
      check(ncclSend(bufs[i], bytes[i], ncclUint8, peers[i], comm_, stream), "ncclSend", comm_);
    else
      check(ncclRecv(bufs[i], bytes[i], ncclUint8, peers[i], comm_, stream), "ncclRecv", comm_);
  }
  check(group.end(), "ncclGroupEnd", comm_);
  endGroup();
}

void NcclComm::allToAll(void* out, const void* in, const size_t* sendBytes,
                        const size_t* recvBytes, cudaStream_t stream) {
  std::lock_guard<std::mutex> lock(mu_);
  requireLive();
  settle("NCCL initialisation");
  DeviceGuard dev(device_);
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
  GroupGuard group(comm_);
  for (const Task& t : plan.tasks()) {
    if (t.kind == Task::Send)
      check(ncclSend(t.src, t.bytes, ncclUint8, t.peer, comm_, stream), "ncclSend", comm_);
    else
      check(ncclRecv(t.dst, t.bytes, ncclUint8, t.peer, comm_, stream), "ncclRecv", comm_);
  }
  check(group.end(), "ncclGroupEnd", comm_);
  endGroup();
}

}  // namespace pycomm::cuda
