// Ring algorithms.  With p ranks, n bytes, alpha the per-step latency, beta the time per
// byte moved and gamma the time per byte reduced:
//   reduce-scatter  (p-1) alpha + (p-1)/p n beta + (p-1)/p n gamma
//   all-gather      (p-1) alpha + (p-1)/p n beta
//   all-reduce      2(p-1) alpha + 2(p-1)/p n beta + (p-1)/p n gamma  (bandwidth-optimal)
//   chain broadcast (p-1) alpha + n beta                              (pipelined)
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

// Reduce-scatter phase shared by all-reduce and reduce-scatter.  At step s rank r sends
// chunk r-s-1 and reduces chunk r-s-2 arriving from r-1, so after p-1 steps it holds the
// full reduction of chunk r.  Partial sums live in `work` (which may be `in` itself);
// the last step writes `own`.  Returns the task ids of the sends and of the final receive.
static int ringReduceScatterPhase(Plan& plan, int rank, int size, const char* in, char* work,
                                  char* own, const Chunks& ch, size_t esize,
                                  std::vector<int>* sends) {
  const int next = mod(rank + 1, size), prev = mod(rank - 1, size);
  int lastRecv = -1;
  for (int s = 0; s < size - 1; ++s) {
    int cs = mod(rank - s - 1, size), cr = mod(rank - s - 2, size);
    const char* src = (s == 0 ? in : work) + ch.offset(cs) * esize;
    sends->push_back(plan.send(next, src, ch.length(cs) * esize, {lastRecv}));
    char* dst = (s == size - 2) ? own : work + ch.offset(cr) * esize;
    lastRecv = plan.recvReduce(prev, dst, in + ch.offset(cr) * esize, ch.length(cr) * esize);
  }
  return lastRecv;
}

void ringAllReduce(Plan& plan, int rank, int size, char* buf, size_t count, size_t esize) {
  if (size == 1 || count == 0) return;
  Chunks ch{count, size};
  std::vector<int> rsSends;
  int lastRecv = ringReduceScatterPhase(plan, rank, size, buf, buf, buf + ch.offset(rank) * esize,
                                        ch, esize, &rsSends);
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
  ringReduceScatterPhase(plan, rank, size, in, scratch, out, ch, esize, &sends);
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

}  // namespace pycomm
