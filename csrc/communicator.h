// A communicator: one group of ranks over one transport.  It numbers the collectives,
// builds the plan of the requested algorithm from the collective table, and runs one
// collective at a time.
// Arguments are assumed valid (the Python layer checks them and says what to do).
#pragma once

#include <atomic>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <vector>

#include "algorithms/collectives.h"
#include "transport/transport.h"

namespace pycomm {

struct P2POp {
  bool isSend;
  int peer;  // receives: -1 for any source
  void* buf;
  size_t bytes;
  int32_t tag = 0;
};

// A posted message that has completed: its id and the peer (for a receive: the sender).
struct MessageDone {
  uint64_t id;
  int peer;
};

class Communicator {
 public:
  explicit Communicator(std::shared_ptr<Transport> transport);

  int rank() const { return t_->rank(); }
  int size() const { return t_->size(); }
  uint64_t seq() const { return seq_; }
  Transport& transport() { return *t_; }
  const std::shared_ptr<Transport>& transportPtr() const { return t_; }

  // Runs one collective (a row of the collective table, algorithms/collectives.h) with
  // a.algo; a.scratch is ignored (the communicator owns the scratch).  a.size must be this
  // communicator's size.  `op` is RedOp::None for collectives that reduce nothing.
  void collective(CollArgs a, DType dtype, RedOp op, double timeoutS);
  void barrier(double timeoutS);

  // Point-to-point messages (MPI's nonblocking semantics).  Posting never blocks: messages
  // progress in progress() and, on a lane of their own, alongside every collective, so
  // ranks may post sends to each other and then receives, in any order and any size,
  // without deadlock.  Matching is MPI's: a receive (src, tag) takes the earliest message
  // from src with that tag that no earlier receive took; messages from one sender with one
  // tag never overtake each other; a receive from any source (peer -1) takes the earliest
  // available message with its tag from any peer, the peers served in turn.  A message
  // that arrives before its receive is posted is drained into a buffer of the communicator
  // (MPI's unexpected queue), so a message with another tag never blocks the lane.  A
  // message and its receive must have the same size (MismatchError otherwise).  A send is
  // complete once its last byte is in the transport (its buffer may be reused), a receive
  // once its bytes are in its buffer.  Buffers must stay valid until then.
  uint64_t post(const P2POp& op, double timeoutS);
  // Progresses pending messages for at most `sliceS` seconds, returning early once one
  // completes; true when none is pending.  Raises (and fails the communicator) when a
  // message passes its deadline or a peer dies.
  bool progress(double sliceS);
  // The messages completed since the last call, each reported once.
  std::vector<MessageDone> completed();
  // Forgets every pending message: nothing is read from or written to their buffers after
  // this returns (a call in progress on another thread finishes first).  Their ids.
  std::vector<uint64_t> cancel();

 private:
  OpDesc next(Coll coll, size_t count, DType dtype, RedOp op, Algo algo, int root);
  void run(Plan& plan, const OpDesc& desc, DType dtype, RedOp op, double timeoutS);
  bool progressLocked(Clock::time_point returnBy);
  char* scratch(size_t bytes);

  struct Send {
    uint64_t id;
    Task task;
    OpDesc desc;  // what every piece carries: seq (per peer), size, tag, this rank as root
    Clock::time_point posted, deadline;
  };
  struct Recv {
    uint64_t id;
    int peer;  // -1: any source
    int32_t tag;
    char* buf;
    size_t bytes;
    Clock::time_point posted, deadline;
    int from = -1;  // the sender, once a message is matched
  };
  struct Unexpected {  // a message that arrived before its receive
    int from;
    OpDesc desc;
    std::unique_ptr<char[]> data;  // uninitialised: pages are touched only as bytes arrive
    size_t bytes = 0;
    bool complete = false;
    uint64_t recv = 0;  // the receive that took it, if any
  };
  struct Incoming {  // the message at the head of a peer's lane, being received
    bool active = false;
    Task task;
    OpDesc desc;
    uint64_t recv = 0;            // its receive, or 0: it goes to `buffer`
    Unexpected* buffer = nullptr;
  };

  // Matches posted receives with buffered messages and with the messages at the head of
  // every lane (binding each to its receive or to a new buffer).
  void match();
  Recv* firstReceiver(int from, const OpDesc& d);
  void bind(Recv& r, int from, const OpDesc& d);  // checks the sizes
  // Adds every message task (optional: riding along a collective) and a probe for every
  // idle lane; then copies their progress back and retires what completed.
  size_t addMessages(Plan& plan, bool optional);
  void collectMessages(const Plan& plan, size_t first);
  void complete(uint64_t id, int peer);
  void finish(Unexpected& u, Recv& r);
  // A receive took a message still arriving: what arrived is copied, the rest goes
  // straight into the receive's buffer, and the message's own buffer is freed.
  void adopt(Unexpected& u, Recv& r);
  void forget(Unexpected& u);
  std::list<Recv>::iterator findRecv(uint64_t id);
  void expire(Clock::time_point now);  // raises for a message past its deadline
  // The oldest pending message, as a descriptor for publish() and error messages, and
  // when it was posted.
  OpDesc waiting(Clock::time_point* since) const;

  // Posting takes postMu_ only, never mu_: a message posted while a collective runs on
  // another thread (an async one on the group's worker) must not wait for it, since a peer
  // may need the message before it can join that collective.  The running collective is
  // interrupted (hasPosts_) and takes the new messages along (absorb()).
  struct Posted {
    uint64_t id;
    P2POp op;
    OpDesc desc;  // sends
    Clock::time_point posted, deadline;
  };
  void absorb();  // mu_ held: moves inbox_ into sends_/recvs_

  std::shared_ptr<Transport> t_;
  mutable std::mutex mu_;
  std::mutex postMu_;                 // inbox_, nextId_, sent_
  std::vector<Posted> inbox_;
  std::atomic<bool> hasPosts_{false};
  uint64_t seq_ = 0;
  std::vector<uint64_t> sent_, received_;  // point-to-point messages per peer, numbered
  std::deque<Send> sends_;                 // pending sends, in posting order
  std::list<Recv> recvs_;                  // pending receives, in posting order
  std::list<Unexpected> unexpected_;       // in arrival order
  std::vector<Incoming> incoming_;         // per peer
  int lastServed_ = -1;                    // the peer a receive from any source took last
  std::vector<MessageDone> completed_;
  uint64_t nextId_ = 0;
  std::vector<char> scratch_;
  char empty_ = 0, sink_ = 0;  // an empty message travels as one byte of no meaning
};

}  // namespace pycomm
