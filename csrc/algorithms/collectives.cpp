// The collective table (collectives.h).  Costs use the constants of cost.h: alpha per
// step, beta per byte moved, gamma per byte reduced; n is the row's `bytes`, p the ranks,
// D the depth of the binary tree, L = ceil(log2 p) the depth of the binomial tree, K =
// floor(log2 p) and e = 1 when p is not a power of two (the exchange all-reduce).
// Bandwidth terms are the busiest rank's.  The algorithm files say where each formula
// comes from (ring.cpp, tree.cpp, pairwise.cpp).
//
// Rooted rows (broadcast, reduce, gather, scatter) take any root.  reduce and gather
// write `out` on the root only and scatter reads `in` on the root only, so the other
// ranks may pass any buffer there (torch's and NCCL's semantics).  Every plan handles one
// rank, count 0, and counts smaller than the number of ranks.
#include "algorithms/collectives.h"

#include <stdexcept>
#include <string>

#include "algorithms/algorithms.h"

namespace pycomm {

namespace {

double f(int p) { return double(p - 1) / p; }
int ceilLog2(int p) {
  int l = 0;
  while ((1 << l) < p) ++l;
  return l;
}

size_t noScratch(const CollArgs&) { return 0; }
// Ring partial sums, or the tree's whole reduction (it keeps this rank's chunk).
size_t wholeInput(const CollArgs& a) { return a.count * size_t(a.size) * a.esize; }
// reduce: partial sums of a rank that is not the root (and, for the ring, the chunks it
// forwards to the root, in the partial sums' place).
size_t oneBuffer(const CollArgs& a) { return a.count * a.esize; }
// gather and scatter: the blocks a rank that is not the root forwards.
size_t forwarded(const CollArgs& a) {
  const int blocks = forwardedBlocks(a.algo == Algo::Ring ? chainNode : binomialNode, a.size);
  return size_t(blocks) * a.count * a.esize;
}

void allReduceRing(Plan& p, int r, const CollArgs& a) {
  p.copy(a.out, a.in, a.count * a.esize);
  ringAllReduce(p, r, a.size, a.out, a.count, a.esize);
}
void allReduceTree(Plan& p, int r, const CollArgs& a) {
  treeAllReduce(p, r, a.size, a.out, a.in, a.count, a.esize, kCollectiveLanes);
}
void allReduceExchange(Plan& p, int r, const CollArgs& a) {
  exchangeAllReduce(p, r, a.size, a.out, a.in, a.scratch, a.count, a.esize);
}
// all_reduce: the exchange reduces into out and scratch in turn (pairwise.cpp).
size_t allReduceScratch(const CollArgs& a) { return a.algo == Algo::Exchange ? a.count * a.esize : 0; }
int floorLog2(int p) {
  int l = 0;
  while ((2 << l) <= p) ++l;
  return l;
}
void reduceScatterRing(Plan& p, int r, const CollArgs& a) {
  ringReduceScatter(p, r, a.size, a.out, a.in, a.scratch, a.count, a.esize);
}
// Latency-bound sizes: all-reduce the whole input in scratch, keep this rank's chunk.
void reduceScatterTree(Plan& p, int r, const CollArgs& a) {
  treeAllReduce(p, r, a.size, a.scratch, a.in, a.count * size_t(a.size), a.esize, kCollectiveLanes);
  p.copyAfter(a.out, a.scratch + size_t(r) * a.count * a.esize, a.count * a.esize);
}
void allGatherRing(Plan& p, int r, const CollArgs& a) {
  ringAllGather(p, r, a.size, a.out, a.in, a.count, a.esize);
}
void allGatherTree(Plan& p, int r, const CollArgs& a) {
  treeAllGather(p, r, a.size, a.out, a.in, a.count, a.esize);
}
void broadcastChain(Plan& p, int r, const CollArgs& a) {
  chainBroadcast(p, r, a.size, a.root, a.out, a.count * a.esize);
}
void broadcastTree(Plan& p, int r, const CollArgs& a) {
  treeBroadcast(p, r, a.size, a.root, a.out, a.count * a.esize);
}
void reduceRing(Plan& p, int r, const CollArgs& a) {
  ringReduce(p, r, a.size, a.root, a.out, a.in, a.scratch, a.count, a.esize);
}
void reduceTree(Plan& p, int r, const CollArgs& a) {
  treeReduce(p, r, a.size, a.root, a.out, a.in, a.scratch, a.count, a.esize, kCollectiveLanes);
}
void gatherChain(Plan& p, int r, const CollArgs& a) {
  chainGather(p, r, a.size, a.root, a.out, a.in, a.scratch, a.count, a.esize);
}
void gatherTree(Plan& p, int r, const CollArgs& a) {
  binomialGather(p, r, a.size, a.root, a.out, a.in, a.scratch, a.count, a.esize);
}
void scatterChain(Plan& p, int r, const CollArgs& a) {
  chainScatter(p, r, a.size, a.root, a.out, a.in, a.scratch, a.count, a.esize);
}
void scatterTree(Plan& p, int r, const CollArgs& a) {
  binomialScatter(p, r, a.size, a.root, a.out, a.in, a.scratch, a.count, a.esize);
}
void allToAllPairwise(Plan& p, int r, const CollArgs& a) {
  pairwiseAllToAll(p, r, a.size, a.out, a.in, a.count, a.esize, a.sendCounts, a.recvCounts);
}
// The root hears from everyone (a tree all-reduce of one byte) before anyone hears back.
void barrierTree(Plan& p, int r, const CollArgs& a) {
  treeAllReduce(p, r, a.size, a.out, a.in, 1, 1, kCollectiveLanes);
}

std::vector<Collective> makeTable() {
  std::vector<Collective> t;
  t.push_back({Coll::AllReduce, "all_reduce", "allreduce", true, false,
               "elements of the buffer", "the buffer", allReduceScratch,
               {{Algo::Ring, "2(p-1)α + 2(p-1)/p·nβ + (p-1)/p·nγ", allReduceRing,
                 [](const CostModel& m, double n, int p) {
                   return 2 * (p - 1) * m.alpha + 2 * f(p) * n * m.beta + f(p) * n * m.gamma;
                 }},
                {Algo::Tree, "2Dα + 2nβ + nγ", allReduceTree, [](const CostModel& m, double n, int p) {
                   return 2 * treeDepth(p) * m.alpha + 2 * n * m.beta + n * m.gamma;
                 }},
                // K = floor(log2 p), e = 1 when p is not a power of two (pairwise.cpp)
                {Algo::Exchange, "(K+2e)α + (K+e)n(β+γ)", allReduceExchange,
                 [](const CostModel& m, double n, int p) {
                   const int k = floorLog2(p), e = (1 << k) < p ? 1 : 0;
                   return (k + 2 * e) * m.alpha + (k + e) * n * (m.beta + m.gamma);
                 }}}});
  t.push_back({Coll::ReduceScatter, "reduce_scatter", "reducescatter", true, false,
               "elements of the output (one rank's block)", "the input", wholeInput,
               {{Algo::Ring, "(p-1)α + (p-1)/p·nβ + (p-1)/p·nγ", reduceScatterRing,
                 [](const CostModel& m, double n, int p) {
                   return (p - 1) * m.alpha + f(p) * n * m.beta + f(p) * n * m.gamma;
                 }},
                {Algo::Tree, "2Dα + 2nβ + nγ", reduceScatterTree, [](const CostModel& m, double n, int p) {
                   return 2 * treeDepth(p) * m.alpha + 2 * n * m.beta + n * m.gamma;
                 }}}});
  t.push_back({Coll::AllGather, "all_gather", "allgather", false, false,
               "elements of the input (one rank's block)", "the output", noScratch,
               {{Algo::Ring, "(p-1)α + (p-1)/p·nβ", allGatherRing,
                 [](const CostModel& m, double n, int p) { return (p - 1) * m.alpha + f(p) * n * m.beta; }},
                {Algo::Tree, "2Dα + 2nβ", allGatherTree, [](const CostModel& m, double n, int p) {
                   return 2 * treeDepth(p) * m.alpha + 2 * n * m.beta;
                 }}}});
  t.push_back({Coll::Broadcast, "broadcast", "broadcast", false, true,
               "elements of the buffer", "the buffer", noScratch,
               {{Algo::Ring, "(p-1)α + nβ", broadcastChain,  // a pipelined chain
                 [](const CostModel& m, double n, int p) { return (p - 1) * m.alpha + n * m.beta; }},
                {Algo::Tree, "Dα + 2nβ", broadcastTree, [](const CostModel& m, double n, int p) {
                   return treeDepth(p) * m.alpha + 2 * n * m.beta;
                 }}}});
  t.push_back({Coll::Reduce, "reduce", "reduce", true, true,
               "elements of the buffer (the result: on the root only)", "the buffer", oneBuffer,
               {{Algo::Ring, "(p-1+L)α + (p-1)/p·n(2β+γ)", reduceRing,  // ring reduce-scatter, binomial gather of the chunks
                 [](const CostModel& m, double n, int p) {
                   return (p - 1 + ceilLog2(p)) * m.alpha + f(p) * n * (2 * m.beta + m.gamma);
                 }},
                {Algo::Tree, "(D+1)α + nβ + nγ", reduceTree, [](const CostModel& m, double n, int p) {
                   return (treeDepth(p) + 1) * m.alpha + n * m.beta + n * m.gamma;
                 }}}});
  t.push_back({Coll::Gather, "gather", "gather", false, true,
               "elements of one rank's input (the root's output holds size blocks, in rank order)",
               "the root's output", forwarded,
               {{Algo::Ring, "(p-1)α + (p-1)/p·nβ", gatherChain,  // a pipelined chain
                 [](const CostModel& m, double n, int p) { return (p - 1) * m.alpha + f(p) * n * m.beta; }},
                {Algo::Tree, "Lα + (p-1)/p·nβ", gatherTree, [](const CostModel& m, double n, int p) {  // binomial
                   return ceilLog2(p) * m.alpha + f(p) * n * m.beta;
                 }}}});
  t.push_back({Coll::Scatter, "scatter", "scatter", false, true,
               "elements of one rank's output (the root's input holds size blocks, in rank order)",
               "the root's input", forwarded,
               {{Algo::Ring, "(p-1)α + (p-1)/p·nβ", scatterChain,  // a pipelined chain
                 [](const CostModel& m, double n, int p) { return (p - 1) * m.alpha + f(p) * n * m.beta; }},
                {Algo::Tree, "Lα + (p-1)/p·nβ", scatterTree, [](const CostModel& m, double n, int p) {  // binomial
                   return ceilLog2(p) * m.alpha + f(p) * n * m.beta;
                 }}}});
  // Per-peer counts (send_counts/recv_counts) replace `count` in the plan, but count stays
  // in the call's descriptor, which ranks compare: with counts, pass the same count (0,
  // say) on every rank.
  t.push_back({Coll::AllToAll, "all_to_all", "alltoall", false, false,
               "elements of one block, each way, unless per-rank counts are given",
               "one rank's input", noScratch,
               {{Algo::Pairwise, "(p-1)α + (p-1)/p·nβ", allToAllPairwise, [](const CostModel& m, double n, int p) {
                   return (p - 1) * m.alpha + f(p) * n * m.beta;
                 }}}});
  t.push_back({Coll::Barrier, "barrier", nullptr, true, false, "1 (one byte)", "nothing",
               noScratch,
               {{Algo::Tree, "2Dα", barrierTree,
                 [](const CostModel& m, double, int p) { return 2 * treeDepth(p) * m.alpha; }}}});
  return t;
}

}  // namespace

const std::vector<Collective>& collectives() {
  static const std::vector<Collective> table = makeTable();
  return table;
}

const Collective& collective(Coll c) {
  for (const Collective& row : collectives())
    if (row.coll == c) return row;
  throw std::invalid_argument("unknown collective code " + std::to_string(int(c)));
}

const AlgoEntry& algorithm(const Collective& c, Algo a) {
  for (const AlgoEntry& e : c.algos)
    if (e.algo == a) return e;
  throw std::invalid_argument(std::string(c.name) + " has no " + algoName(a) + " algorithm");
}

void collectivePlan(Plan& plan, int rank, const CollArgs& a) {
  const Collective& row = collective(a.coll);
  if (row.rooted && (a.root < 0 || a.root >= a.size))
    throw std::invalid_argument(std::string(row.name) + ": root " + std::to_string(a.root) +
                                " is not a rank of this group of " + std::to_string(a.size));
  algorithm(row, a.algo).plan(plan, rank, a);
}

size_t collectiveScratch(const CollArgs& a) { return collective(a.coll).scratch(a); }

}  // namespace pycomm
