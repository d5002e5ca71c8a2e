// Pairwise exchange, for all-to-all.  With p ranks and n the bytes of one rank's input
// (the constants of ring.cpp):
//   all-to-all  (p-1) alpha + (p-1)/p n beta
// At step s = 1..p-1 rank r sends its block for rank r+s and receives rank r-s's block for
// it: at every step each rank sends to one peer and receives from another, so no rank
// waits on a peer busy with someone else.  The steps are not chained: a transport that
// moves independent channels at once (shared memory) overlaps them all, and one that
// groups messages (NCCL) posts them in this order.  Blocks may be of any size, including
// zero, as long as what r sends to q is what q expects from r.
#include <stdexcept>
#include <string>
#include <vector>

#include "algorithms/algorithms.h"

namespace pycomm {

void pairwiseAllToAll(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                      size_t esize, const size_t* sendCounts, const size_t* recvCounts) {
  auto sendCount = [&](int j) { return sendCounts ? sendCounts[j] : count; };
  auto recvCount = [&](int j) { return recvCounts ? recvCounts[j] : count; };
  if (sendCount(rank) != recvCount(rank))
    throw std::invalid_argument("all_to_all: rank " + std::to_string(rank) + " sends itself " +
                                std::to_string(sendCount(rank)) + " elements but expects " +
                                std::to_string(recvCount(rank)) +
                                "; a rank's send and receive counts for itself must be equal");
  std::vector<size_t> sendOff(size_t(size) + 1, 0), recvOff(size_t(size) + 1, 0);
  for (int j = 0; j < size; ++j) {
    sendOff[j + 1] = sendOff[j] + sendCount(j) * esize;
    recvOff[j + 1] = recvOff[j] + recvCount(j) * esize;
  }
  // A receive would overwrite blocks not yet sent.
  if (sendOff[size] && recvOff[size] && out < in + sendOff[size] && in < out + recvOff[size])
    throw std::invalid_argument("all_to_all: the output overlaps the input; pass separate buffers");
  plan.copy(out + recvOff[rank], in + sendOff[rank], sendCount(rank) * esize);
  for (int s = 1; s < size; ++s) {
    const int to = (rank + s) % size, from = (rank - s + size) % size;
    // Empty blocks are skipped on both sides: the peer computes the same count.
    if (sendCount(to)) plan.send(to, in + sendOff[to], sendCount(to) * esize);
    if (recvCount(from)) plan.recvCopy(from, out + recvOff[from], recvCount(from) * esize);
  }
}

}  // namespace pycomm
