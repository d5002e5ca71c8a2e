// Collective algorithms as plan builders.  Each function adds this rank's tasks for one
// collective to a Plan; buffers are raw bytes, counts are elements of `esize` bytes.
// Nothing here knows how bytes travel: see transport/.
#pragma once

#include <cstddef>
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

}  // namespace pycomm
