// The collective table (collectives.h).  Costs use the constants of cost.h: alpha per
// step, beta per byte moved, gamma per byte reduced; n is the row's `bytes`, p the ranks,
// D the depth of the binary tree.  The tree's bandwidth terms are its busiest rank's.
#include "algorithms/collectives.h"

#include <stdexcept>
#include <string>

#include "algorithms/algorithms.h"

namespace pycomm {

namespace {

double f(int p) { return double(p - 1) / p; }

size_t noScratch(const CollArgs&) { return 0; }
// Ring partial sums, or the tree's whole reduction (it keeps this rank's chunk).
size_t wholeInput(const CollArgs& a) { return a.count * size_t(a.size) * a.esize; }

void allReduceRing(Plan& p, int r, const CollArgs& a) {
  p.copy(a.out, a.in, a.count * a.esize);
  ringAllReduce(p, r, a.size, a.out, a.count, a.esize);
}
void allReduceTree(Plan& p, int r, const CollArgs& a) {
  treeAllReduce(p, r, a.size, a.out, a.in, a.count, a.esize, kCollectiveLanes);
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
// The root hears from everyone (a tree all-reduce of one byte) before anyone hears back.
void barrierTree(Plan& p, int r, const CollArgs& a) {
  treeAllReduce(p, r, a.size, a.out, a.in, 1, 1, kCollectiveLanes);
}

std::vector<Collective> makeTable() {
  std::vector<Collective> t;
  t.push_back({Coll::AllReduce, "all_reduce", "allreduce", true, false,
               "elements of the buffer", "the buffer", noScratch,
               {{Algo::Ring, allReduceRing,
                 [](const CostModel& m, double n, int p) {
                   return 2 * (p - 1) * m.alpha + 2 * f(p) * n * m.beta + f(p) * n * m.gamma;
                 }},
                {Algo::Tree, allReduceTree, [](const CostModel& m, double n, int p) {
                   return 2 * treeDepth(p) * m.alpha + 2 * n * m.beta + n * m.gamma;
                 }}}});
  t.push_back({Coll::ReduceScatter, "reduce_scatter", "reducescatter", true, false,
               "elements of the output (one rank's block)", "the input", wholeInput,
               {{Algo::Ring, reduceScatterRing,
                 [](const CostModel& m, double n, int p) {
                   return (p - 1) * m.alpha + f(p) * n * m.beta + f(p) * n * m.gamma;
                 }},
                {Algo::Tree, reduceScatterTree, [](const CostModel& m, double n, int p) {
                   return 2 * treeDepth(p) * m.alpha + 2 * n * m.beta + n * m.gamma;
                 }}}});
  t.push_back({Coll::AllGather, "all_gather", "allgather", false, false,
               "elements of the input (one rank's block)", "the output", noScratch,
               {{Algo::Ring, allGatherRing,
                 [](const CostModel& m, double n, int p) { return (p - 1) * m.alpha + f(p) * n * m.beta; }},
                {Algo::Tree, allGatherTree, [](const CostModel& m, double n, int p) {
                   return 2 * treeDepth(p) * m.alpha + 2 * n * m.beta;
                 }}}});
  t.push_back({Coll::Broadcast, "broadcast", "broadcast", false, true,
               "elements of the buffer", "the buffer", noScratch,
               {{Algo::Ring, broadcastChain,  // a pipelined chain
                 [](const CostModel& m, double n, int p) { return (p - 1) * m.alpha + n * m.beta; }},
                {Algo::Tree, broadcastTree, [](const CostModel& m, double n, int p) {
                   return treeDepth(p) * m.alpha + 2 * n * m.beta;
                 }}}});
  t.push_back({Coll::Barrier, "barrier", nullptr, true, false, "1 (one byte)", "nothing",
               noScratch,
               {{Algo::Tree, barrierTree,
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
  algorithm(collective(a.coll), a.algo).plan(plan, rank, a);
}

size_t collectiveScratch(const CollArgs& a) { return collective(a.coll).scratch(a); }

}  // namespace pycomm
