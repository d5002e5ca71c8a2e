// Ring and chain algorithms.  With p ranks, n bytes (the row's `bytes`, collectives.h),
// alpha the per-step latency, beta the time per byte moved and gamma the time per byte
// reduced:
//   reduce-scatter  (p-1) alpha + (p-1)/p n beta + (p-1)/p n gamma
//   all-gather      (p-1) alpha + (p-1)/p n beta
//   all-reduce      2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma  (bandwidth-optimal)
//   chain broadcast (p-1) alpha + n beta                              (pipelined)
//   reduce          (p-1 + ceil(log2 p)) alpha + (p-1)/p n (2 beta + gamma)
//     a ring reduce-scatter, then the chunks gathered to the root up a binomial tree: the
//     root receives (p-1)/p n in each phase and reduces (p-1)/p n in the first
//   chain gather    (p-1) alpha + (p-1)/p n beta   (n: the root's output)
//   chain scatter   (p-1) alpha + (p-1)/p n beta   (n: the root's input)
//     one message per block, each forwarded piece by piece as it arrives, so the link
//     into (or out of) the root is busy from the first step to the last; the chain loads
//     the ranks next to the root as much as the root, unlike the binomial tree (tree.cpp),
//     which the cost model therefore prefers; the chain is there for PYCOMM_ALGO=ring.
// Each step's chunk streams piece by piece (plan.h), so step s+1 forwards a chunk while
// step s is still receiving it: the ring is pipelined, not store-and-forward.
#include <algorithm>
#include <cstring>
#include <vector>

#include "algorithms/algorithms.h"

namespace pycomm {

namespace {
inline int mod(int a, int p) { return ((a % p) + p) % p; }
}  // namespace

// Reduce-scatter phase shared by all-reduce, reduce-scatter and reduce.  With v = rank -
// first, at step s rank r sends chunk v-s-1 and reduces chunk v-s-2 arriving from r-1, so
// after p-1 steps it holds the full reduction of chunk v (first = 0: chunk r; reduce
// shifts the chunks so that the root holds chunk 0).  Partial sums live in `work` (which
// may be `in` itself); the last step writes `own`.  sends[s] and recvs[s] are step s's
// tasks; returns the final receive.
static int ringReduceScatterPhase(Plan& plan, int rank, int size, int first, const char* in,
                                  char* work, char* own, const Chunks& ch, size_t esize,
                                  std::vector<int>* sends, std::vector<int>* recvs = nullptr) {
  const int next = mod(rank + 1, size), prev = mod(rank - 1, size), v = mod(rank - first, size);
  int lastRecv = -1;
  for (int s = 0; s < size - 1; ++s) {
    int cs = mod(v - s - 1, size), cr = mod(v - s - 2, size);
    const char* src = (s == 0 ? in : work) + ch.offset(cs) * esize;
    sends->push_back(plan.send(next, src, ch.length(cs) * esize, {lastRecv}));
    char* dst = (s == size - 2) ? own : work + ch.offset(cr) * esize;
    lastRecv = plan.recvReduce(prev, dst, in + ch.offset(cr) * esize, ch.length(cr) * esize);
    if (recvs) recvs->push_back(lastRecv);
  }
  return lastRecv;
}

void ringAllReduce(Plan& plan, int rank, int size, char* buf, size_t count, size_t esize) {
  if (size == 1 || count == 0) return;
  Chunks ch{count, size};
  std::vector<int> rsSends;
  int lastRecv = ringReduceScatterPhase(plan, rank, size, 0, buf, buf,
                                        buf + ch.offset(rank) * esize, ch, esize, &rsSends);
  // All-gather phase: rank r starts with chunk r; step s sends chunk r-s and receives
  // chunk r-s-1, which it may overwrite only after its reduce-scatter send of that chunk
  // (step s) has left.
  const int next = mod(rank + 1, size), prev = mod(rank - 1, size);
  for (int s = 0; s < size - 1; ++s) {
    int cs = mod(rank - s, size), cr = mod(rank - s - 1, size);
    plan.send(next, buf + ch.offset(cs) * esize, ch.length(cs) * esize, {lastRecv});
    lastRecv = plan.recvCopy(prev, buf + ch.offset(cr) * esize, ch.length(cr) * esize, {rsSends[s]});
  }
}

void ringReduceScatter(Plan& plan, int rank, int size, char* out, const char* in, char* scratch,
                       size_t count, size_t esize) {
  if (count == 0) return;
  if (size == 1) {
    plan.copy(out, in, count * esize);
    return;
  }
  Chunks ch{count * size_t(size), size};
  std::vector<int> sends;
  ringReduceScatterPhase(plan, rank, size, 0, in, scratch, out, ch, esize, &sends);
}

void ringAllGather(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                   size_t esize) {
  const size_t block = count * esize;
  if (block == 0) return;
  plan.copy(out + size_t(rank) * block, in, block);
  const int next = mod(rank + 1, size), prev = mod(rank - 1, size);
  int lastRecv = -1;
  for (int s = 0; s < size - 1; ++s) {
    int cs = mod(rank - s, size), cr = mod(rank - s - 1, size);
    const char* src = s == 0 ? in : out + size_t(cs) * block;
    plan.send(next, src, block, {lastRecv});
    lastRecv = plan.recvCopy(prev, out + size_t(cr) * block, block);
  }
}

void chainBroadcast(Plan& plan, int rank, int size, int root, char* buf, size_t bytes) {
  if (size == 1 || bytes == 0) return;
  const int v = mod(rank - root, size);  // position along the chain
  int recv = -1;
  if (v > 0) recv = plan.recvCopy(mod(rank - 1, size), buf, bytes);
  if (v < size - 1) plan.send(mod(rank + 1, size), buf, bytes, {recv});
}

void ringReduce(Plan& plan, int rank, int size, int root, char* out, const char* in,
                char* scratch, size_t count, size_t esize) {
  if (count == 0) return;
  if (size == 1) {
    plan.copy(out, in, count * esize);
    return;
  }
  const int v = mod(rank - root, size);
  Chunks ch{count, size};
  // Chunk c is reduced on virtual rank c and gathered to the root (virtual 0) straight
  // into `out`; elsewhere it lands in `scratch`, where the partial sums were, so that a
  // non-root rank writes nothing but scratch.
  char* gathered = v == 0 ? out : scratch;
  std::vector<int> sends, recvs;
  int own = ringReduceScatterPhase(plan, rank, size, root, in, scratch,
                                   gathered + ch.offset(v) * esize, ch, esize, &sends, &recvs);
  RootedBlocks chunks{[&](int c) { return ch.length(c) * esize; },
                      [&](int c) { return gathered + ch.offset(c) * esize; }};
  // A gathered chunk c = v-j lands on bytes the reduce-scatter reads: on the root its
  // input (the root may reduce in place), read by step 0's send (j = 1) or step j-2's
  // receive; elsewhere c's partial sum, read by step j-1's send.  The ring itself orders
  // these (chunk c is complete only after this rank's part of it has left), but the plan
  // says so, so that no transport has to rely on that.
  auto lastUse = [&](int c) {
    const int j = mod(v - c, size);
    if (v == 0) return j == 1 ? sends[0] : recvs[j - 2];
    return j == 1 ? -1 : sends[j - 1];
  };
  gatherBlocks(plan, rank, size, root, binomialNode, chunks, gathered + ch.offset(v) * esize, own,
               lastUse);
}

void chainGather(Plan& plan, int rank, int size, int root, char* out, const char* in,
                 char* scratch, size_t count, size_t esize) {
  rangeGather(plan, rank, size, root, chainNode, out, in, scratch, count, esize);
}

void chainScatter(Plan& plan, int rank, int size, int root, char* out, const char* in,
                  char* scratch, size_t count, size_t esize) {
  rangeScatter(plan, rank, size, root, chainNode, out, in, scratch, count, esize);
}

}  // namespace pycomm
