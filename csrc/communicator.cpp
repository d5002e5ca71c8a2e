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

void Communicator::allReduce(void* out, const void* in, size_t count, DType dtype, RedOp op,
                             Algo algo, double timeoutS) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!canReduce(dtype)) throw std::invalid_argument(std::string("cannot reduce ") + dtypeName(dtype));
  OpDesc d = next(Coll::AllReduce, count, dtype, op, algo, -1);
  t_->publish(d);
  const size_t es = dtypeSize(dtype);
  char* o = static_cast<char*>(out);
  const char* i = static_cast<const char*>(in);
  Plan plan;
  if (algo == Algo::Tree) {
    treeAllReduce(plan, rank(), size(), o, i, count, es, t_->lanes());
  } else {
    if (o != i) std::memcpy(o, i, count * es);
    ringAllReduce(plan, rank(), size(), o, count, es);
  }
  run(plan, d, dtype, op, timeoutS);
}

void Communicator::reduceScatter(void* out, const void* in, size_t count, DType dtype, RedOp op,
                                 Algo algo, double timeoutS) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!canReduce(dtype)) throw std::invalid_argument(std::string("cannot reduce ") + dtypeName(dtype));
  OpDesc d = next(Coll::ReduceScatter, count, dtype, op, algo, -1);
  t_->publish(d);
  const size_t es = dtypeSize(dtype), total = count * size_t(size()) * es;
  char* o = static_cast<char*>(out);
  const char* i = static_cast<const char*>(in);
  Plan plan;
  if (algo == Algo::Tree) {
    // Latency-bound sizes: all-reduce the whole input, keep our chunk.
    char* work = scratch(total);
    treeAllReduce(plan, rank(), size(), work, i, count * size(), es, t_->lanes());
    run(plan, d, dtype, op, timeoutS);
    std::memmove(o, work + size_t(rank()) * count * es, count * es);
    return;
  }
  ringReduceScatter(plan, rank(), size(), o, i, scratch(total), count, es);
  run(plan, d, dtype, op, timeoutS);
}

void Communicator::allGather(void* out, const void* in, size_t count, DType dtype, Algo algo,
                             double timeoutS) {
  std::lock_guard<std::mutex> lock(mu_);
  OpDesc d = next(Coll::AllGather, count, dtype, RedOp::None, algo, -1);
  t_->publish(d);
  const size_t es = dtypeSize(dtype);
  Plan plan;
  if (algo == Algo::Tree)
    treeAllGather(plan, rank(), size(), static_cast<char*>(out), static_cast<const char*>(in), count, es);
  else
    ringAllGather(plan, rank(), size(), static_cast<char*>(out), static_cast<const char*>(in), count, es);
  run(plan, d, DType::U8, RedOp::None, timeoutS);
}

void Communicator::broadcast(void* buf, size_t count, DType dtype, int root, Algo algo,
                             double timeoutS) {
  std::lock_guard<std::mutex> lock(mu_);
  OpDesc d = next(Coll::Broadcast, count, dtype, RedOp::None, algo, root);
  t_->publish(d);
  const size_t bytes = count * dtypeSize(dtype);
  Plan plan;
  if (algo == Algo::Tree)
    treeBroadcast(plan, rank(), size(), root, static_cast<char*>(buf), bytes);
  else
    chainBroadcast(plan, rank(), size(), root, static_cast<char*>(buf), bytes);
  run(plan, d, DType::U8, RedOp::None, timeoutS);
}

void Communicator::barrier(double timeoutS) {
  std::lock_guard<std::mutex> lock(mu_);
  OpDesc d = next(Coll::Barrier, 1, DType::U8, RedOp::Max, Algo::Tree, -1);
  t_->publish(d);
  // A tree all-reduce of one byte: the root hears from everyone before anyone hears back.
  uint8_t in = 1, out = 0;
  Plan plan;
  treeAllReduce(plan, rank(), size(), reinterpret_cast<char*>(&out), reinterpret_cast<char*>(&in), 1,
                1, t_->lanes());
  run(plan, d, DType::U8, RedOp::Max, timeoutS);
}

}  // namespace pycomm
