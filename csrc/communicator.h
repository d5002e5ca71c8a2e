// A communicator: one group of ranks over one transport.  It numbers the collectives,
// picks the plan for the requested algorithm, and runs one collective at a time.
// Arguments are assumed valid (the Python layer checks them and says what to do).
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "algorithms/algorithms.h"
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

  void allReduce(void* out, const void* in, size_t count, DType dtype, RedOp op, Algo algo,
                 double timeoutS);
  void reduceScatter(void* out, const void* in, size_t count, DType dtype, RedOp op, Algo algo,
                     double timeoutS);
  void allGather(void* out, const void* in, size_t count, DType dtype, Algo algo, double timeoutS);
  void broadcast(void* buf, size_t count, DType dtype, int root, Algo algo, double timeoutS);
  void barrier(double timeoutS);
  // Sends and receives run together, so a rank may send to and receive from its
  // neighbours in one call without deadlock (like batch_isend_irecv).
  void sendRecv(const std::vector<P2POp>& ops, double timeoutS);

 private:
  OpDesc next(Coll coll, size_t count, DType dtype, RedOp op, Algo algo, int root);
  void run(Plan& plan, const OpDesc& desc, DType dtype, RedOp op, double timeoutS);
  char* scratch(size_t bytes);

  std::shared_ptr<Transport> t_;
  std::mutex mu_;
  uint64_t seq_ = 0;
  std::vector<uint64_t> sent_, received_;  // point-to-point sequence numbers per peer
  std::vector<char> scratch_;
};

}  // namespace pycomm
