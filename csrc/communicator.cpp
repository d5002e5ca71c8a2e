#include "communicator.h"

#include <cstring>

#include "reduce.h"

namespace pycomm {

Communicator::Communicator(std::shared_ptr<Transport> transport)
    : t_(std::move(transport)), sent_(t_->size(), 0), received_(t_->size(), 0) {}

OpDesc Communicator::next(Coll coll, size_t count, DType dtype, RedOp op, Algo algo, int root) {
  OpDesc d;
  d.seq = ++seq_;
  d.count = count;
  d.coll = int32_t(coll);
  d.dtype = int32_t(dtype);
  d.redop = int32_t(op);
  d.algo = int32_t(algo);
  d.root = root;
  return d;
}

namespace {
Clock::time_point after(double seconds) {
  return Clock::now() +
         std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(seconds));
}
// Point-to-point traffic has a lane of its own (the last one), so posted messages and
// collectives never wait behind each other in a channel.
int p2pLane(const Transport& t) { return t.lanes() - 1; }
}  // namespace

void Communicator::run(Plan& plan, const OpDesc& desc, DType dtype, RedOp op, double timeoutS) {
  // Pending messages ride along: a rank blocked in a collective still delivers what it
  // posted, which its peers may need before they can join the collective.
  for (const LocalCopy& c : plan.copies()) std::memmove(c.dst, c.src, c.bytes);
  const size_t first = plan.tasks().size();
  for (const Pending& p : pending_) plan.addOptional(p.task, p.desc);
  t_->execute(plan, desc, dtype, op, after(timeoutS));
  collect(plan, first);
  for (const LocalCopy& c : plan.copiesAfter()) std::memmove(c.dst, c.src, c.bytes);
}

void Communicator::collect(const Plan& plan, size_t first) {
  // Messages complete in any order across peers; the others keep their posting order.
  std::deque<Pending> still;
  for (size_t i = 0; i < pending_.size(); ++i) {
    Pending& p = pending_[i];
    p.task.done = plan.tasks()[first + i].done;
    if (p.task.done == p.task.bytes)
      completed_.insert(p.id);
    else
      still.push_back(std::move(p));
  }
  pending_.swap(still);
}

uint64_t Communicator::post(const P2POp& op, double timeoutS) {
  std::lock_guard<std::mutex> lock(mu_);
  if (op.peer < 0 || op.peer >= size() || op.peer == rank())
    throw std::invalid_argument("send/recv peer " + std::to_string(op.peer) + " is not another rank");
  OpDesc d;
  d.coll = int32_t(Coll::SendRecv);
  d.dtype = int32_t(DType::U8);
  d.redop = int32_t(RedOp::None);
  d.algo = int32_t(Algo::None);
  d.count = op.bytes;
  // The descriptor a send carries is what the receiver expects: the n-th message from this
  // rank to that peer.  Neither side's numbering depends on other peers.
  d.seq = op.isSend ? ++sent_[op.peer] : ++received_[op.peer];
  d.root = op.isSend ? rank() : op.peer;
  Plan one;  // builds the task the same way every plan does
  int lane = p2pLane(*t_);
  if (op.isSend)
    one.send(op.peer, op.buf, op.bytes, {}, lane);
  else
    one.recvCopy(op.peer, op.buf, op.bytes, {}, lane);
  uint64_t id = ++nextId_;
  pending_.push_back(Pending{id, one.tasks()[0], d, after(timeoutS)});
  return id;
}

bool Communicator::progressLocked(Clock::time_point returnBy) {
  if (pending_.empty()) return true;
  Plan plan;
  Clock::time_point deadline = Clock::time_point::max();
  for (const Pending& p : pending_) {
    plan.tasks().push_back(p.task);
    plan.setDesc(int(plan.tasks().size()) - 1, p.desc);
    deadline = std::min(deadline, p.deadline);
  }
  t_->publish(pending_.front().desc);
  bool finished = t_->execute(plan, pending_.front().desc, DType::U8, RedOp::None, deadline, returnBy);
  collect(plan, 0);
  return finished;
}

bool Communicator::progress(double sliceS) {
  std::lock_guard<std::mutex> lock(mu_);
  return progressLocked(after(sliceS));
}

bool Communicator::done(uint64_t id) {
  std::lock_guard<std::mutex> lock(mu_);
  return completed_.erase(id) > 0;
}

char* Communicator::scratch(size_t bytes) {
  if (scratch_.size() < bytes) scratch_.resize(bytes);
  return scratch_.data();
}

void Communicator::collective(CollArgs a, DType dtype, RedOp op, double timeoutS) {
  std::lock_guard<std::mutex> lock(mu_);
  const Collective& row = pycomm::collective(a.coll);  // also rejects unknown codes
  if (a.size != size()) throw std::invalid_argument("collective arguments for another group size");
  if (row.reduces && !canReduce(dtype))
    throw std::invalid_argument(std::string("cannot reduce ") + dtypeName(dtype));
  a.esize = dtypeSize(dtype);
  a.scratch = scratch(collectiveScratch(a));
  // The plan first: one whose arguments it refuses (a root out of range, say) must not
  // take a sequence number, or this rank would be one collective ahead of its peers.
  Plan plan;
  collectivePlan(plan, rank(), a);
  OpDesc d = next(a.coll, a.count, dtype, row.reduces ? op : RedOp::None, a.algo, row.rooted ? a.root : -1);
  t_->publish(d);
  run(plan, d, row.reduces ? dtype : DType::U8, row.reduces ? op : RedOp::None, timeoutS);
}

void Communicator::barrier(double timeoutS) {
  uint8_t in = 1, out = 0;
  CollArgs a{Coll::Barrier, Algo::Tree, size(), reinterpret_cast<char*>(&out),
             reinterpret_cast<const char*>(&in), nullptr, 1, 1};
  collective(a, DType::U8, RedOp::Max, timeoutS);
}

}  // namespace pycomm
