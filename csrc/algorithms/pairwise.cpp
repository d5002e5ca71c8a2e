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
// against the ring's and the double tree's two.  A large buffer streams through the steps
// piece by piece.
//
// Each reduce writes a buffer other than the one its step sends (out and scratch in
// turn, ending in out), so a step's send and receive never wait for each other: a grouped
// transport (NCCL's rounds, rounds.h) can post both in one round, which it could not if the
// reduce had to follow the send over the same bytes.
//
// Results are bitwise identical on every rank: after step k every rank of a block of 2^k
// ranks holds the same value, and the two partners of step k reduce the same two values,
// each holding one of them, in the same order (the lower rank's first: receivedFirst on
// the higher rank).  Floating-point sums are commutative bit for bit but max(-0, +0) and
// NaN payloads are not, which is why the order is fixed rather than left to each rank.
void exchangeAllReduce(Plan& plan, int rank, int size, char* out, const char* in, char* scratch,
                       size_t count, size_t esize) {
  const size_t bytes = count * esize;
  if (size == 1 || bytes == 0) {  // an empty call still meets its peers (shm.cpp)
    plan.copy(out, in, bytes);
    return;
  }
  int q = 1, k = 0;
  while (q * 2 <= size) q *= 2, ++k;
  if (rank >= q) {  // folded: hand the buffer to rank - q, which sends the result back
    const int sent = plan.send(rank - q, in, bytes);
    plan.recvCopy(rank - q, out, bytes, {sent});  // streams behind the send if in is out
    return;
  }
  const bool takesFolded = rank + q < size;
  // Reduce w (1..writes) goes to buf(w); buf(0) is the input.  The last goes to out, unless
  // the input is out and the count is odd: then to scratch, copied to out at the end.
  const int writes = k + (takesFolded ? 1 : 0);
  const bool endInScratch = in == out && writes % 2 == 1;
  auto buf = [&](int w) -> char* {
    if (w == 0) return const_cast<char*>(in);
    return ((writes - w) % 2 == 0) != endInScratch ? out : scratch;
  };
  int w = 0, lastWrite = -1, lastSend = -1;
  auto reduceFrom = [&](int peer) {
    ++w;
    // Reads buf(w-1) behind the previous reduce; overwrites buf(w), which the previous
    // step's send reads.
    lastWrite = plan.recvReduce(peer, buf(w), buf(w - 1), bytes, {lastWrite, lastSend}, 0, peer < rank);
  };
  if (takesFolded) reduceFrom(rank + q);
  for (int mask = 1; mask < q; mask <<= 1) {
    const int peer = rank ^ mask;
    const int sent = plan.send(peer, buf(w), bytes, {lastWrite});
    reduceFrom(peer);
    lastSend = sent;
  }
  if (takesFolded) plan.send(rank + q, buf(w), bytes, {lastWrite});
  if (endInScratch) plan.copyAfter(out, scratch, bytes);
}

}  // namespace pycomm
