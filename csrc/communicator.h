// A communicator: one group of ranks over one transport.  It numbers the collectives,
// builds the plan of the requested algorithm from the collective table, and runs one
// collective at a time.
// Arguments are assumed valid (the Python layer checks them and says what to do).
#pragma once

#include <deque>
#include <memory>
#include <mutex>
#include <unordered_set>
#include <vector>

#include "algorithms/collectives.h"
#include "transport/transport.h"

namespace pycomm {

struct P2POp {
  bool isSend;
  int peer;
  void* buf;
  size_t bytes;
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
  // Point-to-point messages are posted, then progressed by progress() and, on their own
  // lane, alongside every collective, so posting never blocks: ranks may isend to each
  // other and then irecv, in any order and any size, without deadlock (MPI's
  // nonblocking semantics).  Messages between two ranks match in posting order.
  uint64_t post(const P2POp& op, double timeoutS);
  // Progresses pending messages for at most `sliceS` seconds; true when none is pending.
  // Raises (and fails the communicator) when a message passes its deadline.
  bool progress(double sliceS);
  // Whether message `id` has completed (forgets it once it says yes).
  bool done(uint64_t id);

 private:
  OpDesc next(Coll coll, size_t count, DType dtype, RedOp op, Algo algo, int root);
  void run(Plan& plan, const OpDesc& desc, DType dtype, RedOp op, double timeoutS);
  bool progressLocked(Clock::time_point returnBy);
  // Copies the progress of pending_ back from plan tasks first.. and retires finished ones.
  void collect(const Plan& plan, size_t first);
  char* scratch(size_t bytes);

  struct Pending {
    uint64_t id;
    Task task;
    OpDesc desc;
    Clock::time_point deadline;
  };

  std::shared_ptr<Transport> t_;
  std::mutex mu_;
  uint64_t seq_ = 0;
  std::vector<uint64_t> sent_, received_;  // point-to-point sequence numbers per peer
  std::deque<Pending> pending_;             // posted messages, in posting order
  std::unordered_set<uint64_t> completed_;
  uint64_t nextId_ = 0;
  std::vector<char> scratch_;
};

}  // namespace pycomm
