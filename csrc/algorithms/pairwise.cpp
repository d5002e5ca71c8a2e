// Pairwise exchanges: all-to-all, and the exchange (recursive-doubling) all-reduce for
// latency-bound sizes.
//
// All-to-all.  With p ranks and n the bytes of one rank's input
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

// Exchange all-reduce.  K = floor(log2 p), q = 2^K, e = 1 if p > q (else 0):
//   all-reduce  (K+2e) alpha + (K+e) n (beta + gamma)
// where the busiest rank (one that takes a folded rank) sends and reduces K+e whole
// buffers and the critical path is K+2e hops; for p = 2 one hop: alpha + n beta + n gamma,
// against the ring's and the double tree's two.  Each step is a send and a reduce of
// the same size, so a large buffer streams through the steps piece by piece.
//
// Results are bitwise identical on every rank: after step k every rank of a block of 2^k
// ranks holds the same value, and the two partners of step k reduce the same two values,
// each holding one of them, in the same order (the lower rank's first: receivedFirst on
// the higher rank).  Floating-point sums are commutative bit for bit but max(-0, +0) and
// NaN payloads are not, which is why the order is fixed rather than left to each rank.
void exchangeAllReduce(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                       size_t esize) {
  const size_t bytes = count * esize;
  plan.copy(out, in, bytes);
  if (size == 1 || bytes == 0) return;  // an empty call still meets its peers (shm.cpp)
  int q = 1;
  while (q * 2 <= size) q *= 2;
  if (rank >= q) {  // folded: hand the buffer to rank - q, which sends the result back
    const int sent = plan.send(rank - q, out, bytes);
    plan.recvCopy(rank - q, out, bytes, {sent});
    return;
  }
  const bool takesFolded = rank + q < size;
  int last = takesFolded ? plan.recvReduce(rank + q, out, out, bytes) : -1;
  for (int mask = 1; mask < q; mask <<= 1) {
    const int peer = rank ^ mask;
    // The reduce overwrites what the send reads: it streams behind it (plan.h).
    const int sent = plan.send(peer, out, bytes, {last});
    last = plan.recvReduce(peer, out, out, bytes, {sent}, 0, peer < rank);
  }
  if (takesFolded) plan.send(rank + q, out, bytes, {last});
}

}  // namespace pycomm
