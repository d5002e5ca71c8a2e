#include "communicator.h"

#include <algorithm>
#include <cstring>
#include <iomanip>
#include <new>
#include <sstream>

#include "reduce.h"

namespace pycomm {

Communicator::Communicator(std::shared_ptr<Transport> transport)
    : t_(std::move(transport)), sent_(t_->size(), 0), received_(t_->size(), 0), incoming_(t_->size()) {}

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
  // posted and takes in what arrives, which its peers may need before they can join the
  // collective.  A message arriving at an idle lane wakes the executor, which then
  // resumes the collective where it was once the message is matched.
  for (const LocalCopy& c : plan.copies()) std::memmove(c.dst, c.src, c.bytes);
  const size_t first = plan.tasks().size();
  const Clock::time_point since = Clock::now(), deadline = after(timeoutS);
  for (;;) {
    absorb();
    match();
    plan.tasks().erase(plan.tasks().begin() + long(first), plan.tasks().end());
    addMessages(plan, true);
    const bool finished =
        t_->execute(plan, desc, dtype, op, deadline, Clock::time_point::max(), since, &hasPosts_);
    collectMessages(plan, first);
    if (finished) break;
  }
  for (const LocalCopy& c : plan.copiesAfter()) std::memmove(c.dst, c.src, c.bytes);
}

// ---------------------------------------------------------------------------- messages

uint64_t Communicator::post(const P2POp& op, double timeoutS) {
  std::lock_guard<std::mutex> lock(postMu_);
  if (op.peer == rank() || op.peer >= size() || op.peer < (op.isSend ? 0 : -1))
    throw std::invalid_argument("send/recv peer " + std::to_string(op.peer) + " is not another rank");
  if (op.tag < 0) throw std::invalid_argument("send/recv tag " + std::to_string(op.tag) + " is negative");
  Posted p{++nextId_, op, OpDesc(), Clock::now(), after(timeoutS)};
  if (op.isSend) {
    OpDesc& d = p.desc;
    d.coll = int32_t(Coll::SendRecv);
    d.dtype = int32_t(DType::U8);
    d.redop = int32_t(RedOp::None);
    d.algo = int32_t(Algo::None);
    d.count = op.bytes;          // the whole message, which the receiver checks against its own
    d.seq = ++sent_[op.peer];    // the n-th message from this rank to that peer
    d.root = rank();
    d.tag = op.tag;
  }
  inbox_.push_back(p);
  hasPosts_.store(true, std::memory_order_release);
  return p.id;
}

void Communicator::absorb() {
  if (!hasPosts_.load(std::memory_order_acquire)) return;
  std::vector<Posted> posted;
  {
    std::lock_guard<std::mutex> lock(postMu_);
    posted.swap(inbox_);
    hasPosts_.store(false, std::memory_order_release);
  }
  for (const Posted& p : posted) {
    const P2POp& op = p.op;
    if (!op.isSend) {
      recvs_.push_back(Recv{p.id, op.peer, op.tag, static_cast<char*>(op.buf), op.bytes, p.posted, p.deadline});
      continue;
    }
    // An empty message still travels, as one piece of one byte whose descriptor says 0, so
    // that it is matched like any other.
    Plan one;
    one.send(op.peer, op.bytes ? op.buf : &empty_, std::max<size_t>(op.bytes, 1), {}, p2pLane(*t_));
    sends_.push_back(Send{p.id, one.tasks()[0], p.desc, p.posted, p.deadline});
  }
}

Communicator::Recv* Communicator::firstReceiver(int from, const OpDesc& d) {
  for (Recv& r : recvs_)
    if (r.from < 0 && r.tag == d.tag && (r.peer < 0 || r.peer == from)) return &r;
  return nullptr;
}

void Communicator::bind(Recv& r, int from, const OpDesc& d) {
  if (d.count != r.bytes) {
    std::ostringstream os;
    os << "pycomm: send/recv size mismatch on rank " << rank() << " of " << size() << ": a receive of "
       << r.bytes << " bytes from " << (r.peer < 0 ? "any rank" : "rank " + std::to_string(r.peer))
       << " with tag " << r.tag << " matched message #" << d.seq << " from rank " << from << " (tag "
       << d.tag << "), which has " << d.count
       << " bytes; a send and its receive must have the same size";
    t_->fail(os.str(), 2);
  }
  r.from = from;
}

std::list<Communicator::Recv>::iterator Communicator::findRecv(uint64_t id) {
  for (auto it = recvs_.begin(); it != recvs_.end(); ++it)
    if (it->id == id) return it;
  throw std::logic_error("pycomm: no pending receive #" + std::to_string(id));
}

void Communicator::complete(uint64_t id, int peer) { completed_.push_back(MessageDone{id, peer}); }

void Communicator::forget(Unexpected& u) {
  for (auto it = unexpected_.begin(); it != unexpected_.end(); ++it)
    if (&*it == &u) {
      unexpected_.erase(it);
      return;
    }
}

// A buffered message and the receive that took it are both complete: copy, retire both.
void Communicator::finish(Unexpected& u, Recv& r) {
  if (r.bytes) std::memcpy(r.buf, u.data.get(), r.bytes);
  complete(r.id, u.from);
  recvs_.erase(findRecv(r.id));
  forget(u);
}

void Communicator::adopt(Unexpected& u, Recv& r) {
  Incoming& in = incoming_[u.from];
  if (!in.active || in.buffer != &u || !r.bytes) return;  // finished by finish() instead
  std::memcpy(r.buf, u.data.get(), in.task.done);
  in.task.dst = r.buf;
  in.recv = r.id;
  in.buffer = nullptr;
  forget(u);
}

void Communicator::match() {
  // Receives first take the messages that arrived before them, in posting order; each
  // takes the earliest one it accepts.
  for (auto it = recvs_.begin(); it != recvs_.end();) {
    Recv& r = *it++;  // finish() erases r
    if (r.from >= 0) continue;
    for (Unexpected& u : unexpected_) {
      if (u.recv || u.desc.tag != r.tag || (r.peer >= 0 && r.peer != u.from)) continue;
      bind(r, u.from, u.desc);
      u.recv = r.id;
      if (u.complete)
        finish(u, r);
      else
        adopt(u, r);
      break;
    }
  }
  // Then the message at the head of every idle lane goes to the first posted receive that
  // accepts it, or to a buffer of its own.  Peers are scanned starting after the one a
  // receive from any source took last, so that busy senders are served in turn.
  const int lane = p2pLane(*t_);
  for (int k = 1; k <= size(); ++k) {
    const int p = (lastServed_ + k) % size();
    if (p == rank() || incoming_[p].active) continue;
    OpDesc d;
    if (!t_->peek(p, lane, &d)) continue;
    if (Coll(d.coll) != Coll::SendRecv || d.root != p || d.seq != received_[p] + 1 || d.tag < 0)
      t_->fail("pycomm: rank " + std::to_string(rank()) + " expected the start of message #" +
                   std::to_string(received_[p] + 1) + " from rank " + std::to_string(p) +
                   " on its message lane but found " + describe(d) + "; the group cannot go on",
               0);
    ++received_[p];
    Incoming& in = incoming_[p];
    in = Incoming{};
    in.active = true;
    in.desc = d;
    Plan one;
    if (Recv* r = firstReceiver(p, d)) {
      bind(*r, p, d);
      if (r->peer < 0) lastServed_ = p;
      in.recv = r->id;
      one.recvCopy(p, d.count ? r->buf : &sink_, std::max<size_t>(d.count, 1), {}, lane);
    } else {
      unexpected_.push_back(Unexpected{p, d});
      Unexpected& u = unexpected_.back();
      u.bytes = std::max<size_t>(d.count, 1);
      u.data.reset(new (std::nothrow) char[u.bytes]);
      if (!u.data)
        t_->fail("pycomm: rank " + std::to_string(rank()) + " cannot buffer " + describe(d) +
                     " (no receive is posted for it yet): out of memory",
                 0);
      in.buffer = &u;
      one.recvCopy(p, u.data.get(), u.bytes, {}, lane);
    }
    in.task = one.tasks()[0];
  }
}

size_t Communicator::addMessages(Plan& plan, bool optional) {
  const size_t first = plan.tasks().size();
  auto add = [&](const Task& t, const OpDesc* d) {
    plan.tasks().push_back(t);
    Task& added = plan.tasks().back();
    added.optional = optional;
    added.wake = true;  // a message done or arriving: the caller retires or matches it
    if (d) plan.setDesc(int(plan.tasks().size()) - 1, *d);
  };
  for (const Send& s : sends_) add(s.task, &s.desc);
  for (int p = 0; p < size(); ++p)
    if (incoming_[p].active) add(incoming_[p].task, &incoming_[p].desc);
  const int lane = p2pLane(*t_);
  for (int p = 0; p < size(); ++p) {
    if (p == rank() || incoming_[p].active) continue;
    // Built in place, not through a Plan of its own: this runs on every collective, and a
    // small all-reduce takes a few microseconds in all.
    Task probe{Task::Probe, p, lane, nullptr, nullptr, 1, {-1, -1, -1}, 0};
    add(probe, nullptr);
  }
  return plan.tasks().size() - first;
}

void Communicator::collectMessages(const Plan& plan, size_t first) {
  // Messages complete in any order across peers; the others keep their posting order.
  size_t i = first;
  if (!sends_.empty()) {  // constructing a deque allocates: not on every collective
    std::deque<Send> still;
    for (Send& s : sends_) {
      s.task.done = plan.tasks()[i++].done;
      if (s.task.done == s.task.bytes)
        complete(s.id, s.task.peer);
      else
        still.push_back(std::move(s));
    }
    sends_.swap(still);
  }
  for (int p = 0; p < size(); ++p) {
    Incoming& in = incoming_[p];
    if (!in.active) continue;
    in.task.done = plan.tasks()[i++].done;
    if (in.task.done < in.task.bytes) continue;
    in.active = false;
    if (in.recv) {
      recvs_.erase(findRecv(in.recv));
      complete(in.recv, p);
    } else {
      in.buffer->complete = true;
      if (in.buffer->recv) finish(*in.buffer, *findRecv(in.buffer->recv));
    }
  }
  // Probes keep nothing: match() looks at the lanes again.
}

OpDesc Communicator::waiting(Clock::time_point* since) const {
  OpDesc d;
  d.coll = int32_t(Coll::SendRecv);
  d.dtype = int32_t(DType::U8);
  d.redop = int32_t(RedOp::None);
  d.algo = int32_t(Algo::None);
  const Send* s = sends_.empty() ? nullptr : &sends_.front();
  const Recv* r = recvs_.empty() ? nullptr : &recvs_.front();
  if (s && (!r || s->posted <= r->posted)) {
    d.seq = s->desc.seq;
    d.count = s->desc.count;
    d.root = s->task.peer;
    d.tag = s->desc.tag;
    *since = s->posted;
  } else if (r) {
    d.count = r->bytes;
    d.root = r->from >= 0 ? r->from : r->peer;
    d.tag = r->tag;
    *since = r->posted;
  }
  return d;
}

namespace {
std::string seconds(Clock::duration d) {
  std::ostringstream os;
  os << std::fixed << std::setprecision(3) << std::chrono::duration<double>(d).count();
  return os.str();
}
}  // namespace

void Communicator::expire(Clock::time_point now) {
  const std::string on = " on rank " + std::to_string(rank()) + " of " + std::to_string(size());
  for (const Send& s : sends_) {
    if (now < s.deadline) continue;
    const int p = s.task.peer;
    std::ostringstream os;
    os << "pycomm: send to rank " << p << " (tag " << s.desc.tag << ", " << s.desc.count
       << " bytes) timed out after " << seconds(now - s.posted) << " s" << on << ": waiting for rank "
       << p << " to take ";
    if (s.task.done)
      os << "the last " << (s.task.bytes - s.task.done) << " bytes";
    else
      os << "it";
    os << " (" << t_->peerState(p) << ")";
    t_->fail(os.str(), 1);
  }
  for (const Recv& r : recvs_) {
    if (now < r.deadline) continue;
    std::ostringstream os;
    os << "pycomm: recv from " << (r.peer < 0 ? "any rank" : "rank " + std::to_string(r.peer)) << " (tag "
       << r.tag << ", " << r.bytes << " bytes) timed out after " << seconds(now - r.posted) << " s" << on
       << ": ";
    const int from = r.from >= 0 ? r.from : r.peer;
    if (from >= 0) {
      os << "waiting for rank " << from << " (";
      const Incoming& in = incoming_[from];
      if (in.active && in.recv == r.id)
        os << "got " << std::min(in.task.done, r.bytes) << " of " << r.bytes << " bytes; ";
      os << t_->peerState(from) << ")";
    } else {
      os << "no rank sent a message with tag " << r.tag << " (";
      for (int p = 0, n = 0; p < size(); ++p)
        if (p != rank()) os << (n++ ? "; " : "") << t_->peerState(p);
      os << ")";
    }
    t_->fail(os.str(), 1);
  }
}

bool Communicator::progressLocked(Clock::time_point returnBy) {
  const size_t before = completed_.size();
  for (;;) {
    absorb();
    match();
    if (sends_.empty() && recvs_.empty()) return true;
    if (completed_.size() > before) return false;
    Plan plan;
    addMessages(plan, false);
    Clock::time_point deadline = returnBy, since;
    for (const Send& s : sends_) deadline = std::min(deadline, s.deadline);
    for (const Recv& r : recvs_) deadline = std::min(deadline, r.deadline);
    const OpDesc w = waiting(&since);
    t_->publish(w);
    // Deadlines are the messages' own (expire, below), so the transport gets none; it
    // checks the peers' liveness from 5 ms after the oldest message was posted.
    t_->execute(plan, w, DType::U8, RedOp::None, Clock::time_point::max(), deadline, since, &hasPosts_);
    collectMessages(plan, 0);
    if (completed_.size() > before) return sends_.empty() && recvs_.empty();
    const Clock::time_point now = Clock::now();
    expire(now);
    if (now >= returnBy) return false;
  }
}

bool Communicator::progress(double sliceS) {
  std::lock_guard<std::mutex> lock(mu_);
  return progressLocked(after(sliceS));
}

std::vector<MessageDone> Communicator::completed() {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<MessageDone> out;
  out.swap(completed_);
  return out;
}

std::vector<uint64_t> Communicator::cancel() {
  std::lock_guard<std::mutex> lock(mu_);
  absorb();
  std::vector<uint64_t> ids;
  for (const Send& s : sends_) ids.push_back(s.id);
  for (const Recv& r : recvs_) ids.push_back(r.id);
  sends_.clear();
  recvs_.clear();
  unexpected_.clear();
  for (Incoming& in : incoming_) in = Incoming{};
  return ids;
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
  plan.tasks().reserve(size_t(2 * size()) + 4);  // one allocation for a small plan and the probes
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
