// Collective algorithms as plan builders.  Each function adds this rank's tasks for one
// collective to a Plan; buffers are raw bytes, counts are elements of `esize` bytes.
// Nothing here knows how bytes travel: see transport/.
#pragma once

#include <algorithm>
#include <cstddef>
#include <functional>
#include <vector>

#include "algorithms/plan.h"

namespace pycomm {

// Balanced split of `count` elements into `parts` chunks: the first count % parts chunks
// get one element more.  Any count works, including counts smaller than `parts`.
struct Chunks {
  size_t count;
  int parts;
  size_t offset(int i) const {
    size_t base = count / parts, rem = count % parts;
    return size_t(i) * base + std::min<size_t>(size_t(i), rem);
  }
  size_t length(int i) const { return count / parts + (size_t(i) < count % parts ? 1 : 0); }
};

// A binary tree over ranks 0..size-1 (NCCL's construction: in-order numbering, so that
// the mirrored tree makes every interior rank a leaf of the other tree).
struct TreeNode {
  int parent = -1;
  int child[2] = {-1, -1};
};
TreeNode binaryTree(int rank, int size);
// which = 0: the binary tree; which = 1: its mirror (size even) or its shift by one rank
// (size odd).  Together: NCCL's double binary tree.
TreeNode doubleTree(int rank, int size, int which);

// Rooted collectives number the ranks from their root, v = (rank - root) mod size, so that
// each rooted algorithm is written once, for root 0.  In the trees below every subtree is
// a range [v, end) of these virtual ranks: a rank can then name, without asking, the
// blocks its parent or child will send it.
struct RangeNode {
  int parent = -1;            // virtual rank; -1 at the root
  std::vector<int> children;  // virtual ranks, the largest subtree first
  int end = 0;                // the subtree of v is [v, end)
};
using RangeTree = RangeNode (*)(int v, int size);
// Binomial tree: v's parent is v with its lowest set bit cleared; its children are v + 2^k
// for every 2^k below that bit (at the root: below size).  Depth ceil(log2 size).
RangeNode binomialNode(int v, int size);
// Chain: v's parent is v - 1, its child v + 1.  Depth size - 1.
RangeNode chainNode(int v, int size);
// The most blocks any non-root rank of `tree` forwards (its subtree less its own block):
// the scratch, in blocks, of gatherBlocks/scatterBlocks on a non-root rank.
int forwardedBlocks(RangeTree tree, int size);

// Where the blocks of a rooted gather or scatter are on this rank; block b is virtual
// rank b's.
struct RootedBlocks {
  std::function<size_t(int b)> bytes;  // the same on every rank
  std::function<char*(int b)> buf;     // this rank's buffer for block b (own block: see below)
};
// Moves block b from virtual rank b to the root along `tree`, one message per block, so a
// rank forwards a block piece by piece while it arrives.  This rank's block is sent from
// `own` once task `ownReady` allows; `recvAfter(b)`, when given, is a task of b's size that
// must handle each byte of buf(b) before a receive overwrites it (or -1).
void gatherBlocks(Plan& plan, int rank, int size, int root, RangeTree tree,
                  const RootedBlocks& blocks, const char* own, int ownReady,
                  const std::function<int(int)>& recvAfter = {});
// Moves block b from the root (where buf(b) holds it) to virtual rank b along `tree`, into
// `own` there; blocks for the largest subtree go first, since they have the furthest to
// go.  The root's own block is the caller's to copy.
void scatterBlocks(Plan& plan, int rank, int size, int root, RangeTree tree,
                   const RootedBlocks& blocks, char* own);
// gather: out on `root` (size*count elements, rank order) = every rank's `in` (count
// elements), along `tree`; writes out on the root only, where in may be out's own block.
// scatter: out (count elements) = block `rank` of the root's `in` (size*count elements);
// reads in on the root only, where out may be in's own block.  Both need scratch for
// forwardedBlocks(tree, size) blocks.
void rangeGather(Plan& plan, int rank, int size, int root, RangeTree tree, char* out,
                 const char* in, char* scratch, size_t count, size_t esize);
void rangeScatter(Plan& plan, int rank, int size, int root, RangeTree tree, char* out,
                  const char* in, char* scratch, size_t count, size_t esize);

// ring.cpp ----------------------------------------------------------------------------
// all-reduce in place on `buf`: reduce-scatter then all-gather around the ring.
void ringAllReduce(Plan& plan, int rank, int size, char* buf, size_t count, size_t esize);
// out (count elements) = reduction of chunk `rank` of every rank's `in` (size*count elements).
// `scratch` holds size*count elements; out may be in's own chunk (NCCL's in-place layout).
void ringReduceScatter(Plan& plan, int rank, int size, char* out, const char* in, char* scratch,
                       size_t count, size_t esize);
// out (size*count elements) = every rank's `in` (count elements), in rank order.
void ringAllGather(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                   size_t esize);
// buf from `root` to every rank along a pipelined chain root, root+1, ...
void chainBroadcast(Plan& plan, int rank, int size, int root, char* buf, size_t bytes);
// out on `root` = reduction of every rank's `in` (count elements; out may be in): a ring
// reduce-scatter that leaves chunk v on virtual rank v, then a binomial gather of the
// chunks.  Writes out on the root only.  `scratch` holds count elements.
void ringReduce(Plan& plan, int rank, int size, int root, char* out, const char* in,
                char* scratch, size_t count, size_t esize);
// rangeGather and rangeScatter along the chain root, root+1, ..., root+size-1 (tree.cpp).
void chainGather(Plan& plan, int rank, int size, int root, char* out, const char* in,
                 char* scratch, size_t count, size_t esize);
void chainScatter(Plan& plan, int rank, int size, int root, char* out, const char* in,
                  char* scratch, size_t count, size_t esize);

// tree.cpp ----------------------------------------------------------------------------
// out = reduction of every rank's `in` (count elements; out may be in) over the double
// binary tree: half the elements reduce up and come back down each tree, on its own lane.
void treeAllReduce(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                   size_t esize, int lanes);
// Gathers every rank's block up tree 0 and sends each rank the blocks it lacks down it.
void treeAllGather(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                   size_t esize);
// buf from `root` down a binary tree rooted at `root`.
void treeBroadcast(Plan& plan, int rank, int size, int root, char* buf, size_t bytes);
// out on `root` = reduction of every rank's `in` (count elements; out may be in): half the
// elements reduce up each tree of the double binary tree, on its own lane, and the root
// of tree 1 hands its half to `root`.  Writes out on the root only; the other ranks keep
// partial sums in `scratch` (count elements).
void treeReduce(Plan& plan, int rank, int size, int root, char* out, const char* in,
                char* scratch, size_t count, size_t esize, int lanes);
// rangeGather and rangeScatter along the binomial tree.
void binomialGather(Plan& plan, int rank, int size, int root, char* out, const char* in,
                    char* scratch, size_t count, size_t esize);
void binomialScatter(Plan& plan, int rank, int size, int root, char* out, const char* in,
                     char* scratch, size_t count, size_t esize);

// pairwise.cpp ------------------------------------------------------------------------
// all-to-all: this rank sends sendCounts[j] elements to rank j from consecutive blocks of
// `in` and receives recvCounts[j] elements from rank j into consecutive blocks of `out`
// (null counts: `count` each).  The own block is a local copy, so sendCounts[rank] must
// equal recvCounts[rank]; out must not overlap in.  At step s the rank sends to rank+s
// and receives from rank-s.
void pairwiseAllToAll(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                      size_t esize, const size_t* sendCounts, const size_t* recvCounts);
// all-reduce by recursive doubling: out = reduction of every rank's `in` (count elements;
// out may be in), whole buffers exchanged with rank ^ 2^k at step k, one hop per step.
// With p not a power of two, the ranks past the largest power q fold into rank - q first
// and get the result back last.  Every rank gets the same bits (see the .cpp).  `scratch`
// holds count elements.
void exchangeAllReduce(Plan& plan, int rank, int size, char* out, const char* in, char* scratch,
                       size_t count, size_t esize);

}  // namespace pycomm
