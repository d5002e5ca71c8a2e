// A plan is what an algorithm produces and a transport executes: for one rank, the sends
// and receives of one collective, with the local dependencies between them.
//
// Tasks to (or from) one peer on one lane are carried in the order they were added, and the
// peer adds its matching tasks in the same order; algorithms guarantee that.  A dependency
// on a task of the same byte size *streams*: the dependent task may handle byte k as soon
// as the task it depends on has handled byte k (this is what pipelines a ring: a chunk is
// forwarded piece by piece while it is still arriving).  A dependency on a task of another
// size waits for that task to finish.
#pragma once

#include <cstddef>
#include <initializer_list>
#include <stdexcept>
#include <vector>

#include "common.h"

namespace pycomm {

// A copy inside this rank's memory that must happen before any task runs (an algorithm's
// own block placed into the output, say), or after all of them (Plan::copyAfter).  Kept in the plan rather than done by the
// algorithm so that a transport whose buffers live on a GPU can make it a device copy.
struct LocalCopy {
  char* dst;
  const char* src;
  size_t bytes;
};

struct Task {
  // Probe: done (consuming nothing) once a piece waits at the head of its lane; how a
  // caller that matches messages itself (point-to-point) learns that one arrived.
  enum Kind { Send, RecvCopy, RecvReduce, Probe };
  Kind kind;
  int peer;
  int lane;             // independent FIFO channels to one peer (e.g. one per tree)
  char* dst;            // receives: where the bytes (or the reduced bytes) go
  const char* src;      // send: the bytes; RecvReduce: dst = src op received (src may be dst)
  size_t bytes;
  int deps[3];
  int ndeps;
  int desc = -1;        // index into Plan::descs(), or -1 for the collective's descriptor
  bool optional = false;  // progressed when possible, but the plan may finish without it
  bool wake = false;      // execution returns (to be resumed) as soon as this task is done
  // RecvReduce: dst = received op src instead of src op received.  Two ranks that reduce
  // the same pair of buffers, each holding one of them, put the same one first, so that
  // an op that is not commutative bit for bit (max of -0 and +0, NaN payloads) still
  // leaves the same bits on both (the exchange all-reduce, pairwise.cpp).
  bool receivedFirst = false;
  size_t done = 0;      // bytes handled so far (executor state)
};

class Plan {
 public:
  int send(int peer, const void* src, size_t bytes, std::initializer_list<int> deps = {},
           int lane = 0) {
    return add(Task::Send, peer, lane, nullptr, static_cast<const char*>(src), bytes, deps);
  }
  int recvCopy(int peer, void* dst, size_t bytes, std::initializer_list<int> deps = {},
               int lane = 0) {
    return add(Task::RecvCopy, peer, lane, static_cast<char*>(dst), nullptr, bytes, deps);
  }
  int probe(int peer, int lane) { return add(Task::Probe, peer, lane, nullptr, nullptr, 1, {}); }
  int recvReduce(int peer, void* dst, const void* src, size_t bytes,
                 std::initializer_list<int> deps = {}, int lane = 0, bool receivedFirst = false) {
    const int i = add(Task::RecvReduce, peer, lane, static_cast<char*>(dst),
                      static_cast<const char*>(src), bytes, deps);
    tasks_[i].receivedFirst = receivedFirst;
    return i;
  }
  // dst and src may overlap (executed as memmove).
  void copy(void* dst, const void* src, size_t bytes) {
    if (dst != src && bytes > 0)
      copies_.push_back({static_cast<char*>(dst), static_cast<const char*>(src), bytes});
  }
  // A copy after every task is done (a result moved out of scratch, say).
  void copyAfter(void* dst, const void* src, size_t bytes) {
    if (dst != src && bytes > 0)
      after_.push_back({static_cast<char*>(dst), static_cast<const char*>(src), bytes});
  }
  const std::vector<LocalCopy>& copies() const { return copies_; }
  const std::vector<LocalCopy>& copiesAfter() const { return after_; }
  std::vector<Task>& tasks() { return tasks_; }
  const std::vector<Task>& tasks() const { return tasks_; }
  // Point-to-point tasks carry their own descriptor (a per-peer sequence number).
  // Adds an already-started task (its `done` counts) that the plan progresses but does not
  // wait for: pending point-to-point messages ride along with every collective.
  int addOptional(const Task& t, const OpDesc& d) {
    tasks_.push_back(t);
    tasks_.back().ndeps = 0;
    tasks_.back().optional = true;
    setDesc(int(tasks_.size()) - 1, d);
    return int(tasks_.size()) - 1;
  }
  void setDesc(int task, const OpDesc& d) {
    descs_.push_back(d);
    tasks_[task].desc = int(descs_.size()) - 1;
  }
  const OpDesc& descOf(const Task& t, const OpDesc& fallback) const {
    return t.desc < 0 ? fallback : descs_[t.desc];
  }

 private:
  int add(Task::Kind kind, int peer, int lane, char* dst, const char* src, size_t bytes,
          std::initializer_list<int> deps) {
    Task t{kind, peer, lane, dst, src, bytes, {-1, -1, -1}, 0};
    for (int d : deps) {
      if (d < 0) continue;  // "no dependency" placeholders keep call sites uniform
      if (t.ndeps == 3) throw std::logic_error("a task has at most three dependencies");
      t.deps[t.ndeps++] = d;
    }
    tasks_.push_back(t);
    return int(tasks_.size()) - 1;
  }
  std::vector<Task> tasks_;
  std::vector<OpDesc> descs_;
  std::vector<LocalCopy> copies_, after_;
};

}  // namespace pycomm
