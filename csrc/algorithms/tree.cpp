// Tree algorithms, for latency-bound sizes: a tree of depth d needs about 2d steps where a
// ring needs 2(p-1).  With p ranks, n bytes (the row's `bytes`, collectives.h), D the
// depth of the binary tree and the constants of ring.cpp:
//   all-reduce (double binary tree, pipelined)  2 D alpha + 2 n beta + n gamma
//     each half of the buffer reduces up one tree and comes back down it; a rank is
//     interior in at most one of the two trees, where it takes two children's halves in
//     and sends its half up, then takes the result in and sends it to two children: with
//     its leaf traffic in the other tree, about 2n bytes each way at the busiest rank
//   all-gather (gather up, then down)           2 D alpha + 2 n beta (the root: all in, all out)
//   broadcast  (binary tree)                    D alpha + 2 n beta (an interior rank sends twice)
//   reduce     (double binary tree, pipelined)  (D+1) alpha + n beta + n gamma
//     the upward half of all-reduce, relabelled so that `root` is tree 0's root; tree 1's
//     root hands its half to `root`, one more step (streamed, so it adds latency only)
//   gather     (binomial tree)                  ceil(log2 p) alpha + (p-1)/p n beta
//   scatter    (binomial tree)                  ceil(log2 p) alpha + (p-1)/p n beta
//     n: the root's output (gather) or input (scatter); the root moves (p-1)/p n bytes,
//     every other rank less, and a block travels at most ceil(log2 p) hops
// Reductions at a node always combine own + child0 + child1 in that order, and a result
// travels unchanged from where it was completed, so every run gives the same bits.
#include <algorithm>
#include <cstring>
#include <vector>

#include "algorithms/algorithms.h"

namespace pycomm {

// NCCL's btree (graph/trees.cc): rank r's parent flips r's lowest set bit into the next
// one; its children sit half that bit below and above it.  Rank 0 is the root and has a
// single child, the highest power of two below size.
TreeNode binaryTree(int rank, int size) {
  TreeNode n;
  if (size <= 1) return n;
  int bit = 1;
  while (bit < size && !(rank & bit)) bit <<= 1;
  if (rank == 0) {
    n.child[1] = bit >> 1;
    return n;
  }
  int up = (rank ^ bit) | (bit << 1);
  if (up >= size) up = rank ^ bit;
  n.parent = up;
  int low = bit >> 1;
  if (low == 0) return n;  // odd ranks are leaves
  n.child[0] = rank - low;
  int down = rank + low;
  while (down >= size && low > 0) {
    low >>= 1;
    down = rank + low;
  }
  n.child[1] = low > 0 ? down : -1;
  return n;
}

TreeNode doubleTree(int rank, int size, int which) {
  if (which == 0 || size <= 1) return binaryTree(rank, size);
  // Mirror (even size) or shift (odd size) the ranks, build the tree, map the ranks back.
  bool mirror = size % 2 == 0;
  auto to = [&](int r) { return mirror ? size - 1 - r : (r + size - 1) % size; };
  auto from = [&](int v) { return v < 0 ? -1 : (mirror ? size - 1 - v : (v + 1) % size); };
  TreeNode t = binaryTree(to(rank), size);
  TreeNode n;
  n.parent = from(t.parent);
  n.child[0] = from(t.child[0]);
  n.child[1] = from(t.child[1]);
  return n;
}

void treeAllReduce(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                   size_t esize, int lanes) {
  if (count == 0) return;
  if (size == 1) {
    plan.copy(out, in, count * esize);
    return;
  }
  const int trees = std::min(2, lanes);
  Chunks halves{count, trees};
  for (int t = 0; t < trees; ++t) {
    const size_t bytes = halves.length(t) * esize, off = halves.offset(t) * esize;
    if (bytes == 0) continue;  // every rank skips the same empty half
    TreeNode node = doubleTree(rank, size, t);
    char* buf = out + off;
    const char* mine = in + off;
    // Up: buf = mine + child0 + child1, streamed piece by piece, then on to the parent.
    int last = -1;
    const char* acc = mine;
    for (int c : node.child) {
      if (c < 0) continue;
      last = plan.recvReduce(c, buf, acc, bytes, {last}, t);
      acc = buf;
    }
    int up = -1;
    if (node.parent >= 0) up = plan.send(node.parent, acc, bytes, {last}, t);
    // Down: the result comes from the parent (or is the root's own) and goes to the
    // children.  A receive overwrites buf only behind the bytes already sent up.
    int have = last;
    const char* result = acc;
    if (node.parent >= 0) {
      have = plan.recvCopy(node.parent, buf, bytes, {up}, t);
      result = buf;
    } else if (last < 0) {
      plan.copy(buf, mine, bytes);  // a root with no children (not reached for size > 1)
    }
    for (int c : node.child)
      if (c >= 0) plan.send(c, result, bytes, {have}, t);
  }
}

namespace {

// children[r] for every rank of tree 0, and each rank's subtree in rank order.
struct TreeShape {
  std::vector<TreeNode> nodes;
  std::vector<std::vector<int>> subtree;
  TreeShape(int size) : nodes(size), subtree(size) {
    for (int r = 0; r < size; ++r) nodes[r] = binaryTree(r, size);
    for (int r = 0; r < size; ++r)
      for (int a = r; a >= 0; a = nodes[a].parent) subtree[a].push_back(r);
  }
  bool inSubtree(int root, int r) const {
    const auto& s = subtree[root];
    return std::binary_search(s.begin(), s.end(), r);
  }
};

}  // namespace

void treeAllGather(Plan& plan, int rank, int size, char* out, const char* in, size_t count,
                   size_t esize) {
  const size_t block = count * esize;
  if (block == 0) return;
  plan.copy(out + size_t(rank) * block, in, block);
  if (size == 1) return;
  TreeShape shape(size);
  const TreeNode& me = shape.nodes[rank];
  std::vector<int> got(size, -1);  // task that delivers block b to this rank
  // Up: collect each child's subtree, then pass our whole subtree to the parent.
  for (int c : me.child) {
    if (c < 0) continue;
    for (int b : shape.subtree[c]) got[b] = plan.recvCopy(c, out + size_t(b) * block, block);
  }
  if (me.parent >= 0) {
    for (int b : shape.subtree[rank])
      plan.send(me.parent, b == rank ? in : out + size_t(b) * block, block, {got[b]});
    // Down: the parent sends every block outside our subtree.
    for (int b = 0; b < size; ++b)
      if (!shape.inSubtree(rank, b)) got[b] = plan.recvCopy(me.parent, out + size_t(b) * block, block);
  }
  for (int c : me.child) {
    if (c < 0) continue;
    for (int b = 0; b < size; ++b)
      if (!shape.inSubtree(c, b))
        plan.send(c, b == rank ? in : out + size_t(b) * block, block, {got[b]});
  }
}

void treeBroadcast(Plan& plan, int rank, int size, int root, char* buf, size_t bytes) {
  if (size == 1 || bytes == 0) return;
  auto real = [&](int v) { return v < 0 ? -1 : (v + root) % size; };
  TreeNode node = binaryTree((rank - root + size) % size, size);
  int have = -1;
  if (node.parent >= 0) have = plan.recvCopy(real(node.parent), buf, bytes);
  for (int c : node.child)
    if (c >= 0) plan.send(real(c), buf, bytes, {have});
}

void treeReduce(Plan& plan, int rank, int size, int root, char* out, const char* in,
                char* scratch, size_t count, size_t esize, int lanes) {
  if (count == 0) return;
  if (size == 1) {
    plan.copy(out, in, count * esize);
    return;
  }
  // Virtual ranks put `root` at virtual 0, the root of tree 0.
  const int v = (rank - root + size) % size;
  auto real = [&](int x) { return x < 0 ? -1 : (x + root) % size; };
  const int trees = std::min(2, lanes);
  Chunks halves{count, trees};
  for (int t = 0; t < trees; ++t) {
    const size_t bytes = halves.length(t) * esize, off = halves.offset(t) * esize;
    if (bytes == 0) continue;  // every rank skips the same empty half
    TreeNode node = doubleTree(v, size, t);
    // Partial sums go where the result will be on the root, and to scratch elsewhere.
    char* buf = (v == 0 ? out : scratch) + off;
    const char* mine = in + off;
    int last = -1;
    const char* acc = mine;
    for (int c : node.child) {
      if (c < 0) continue;
      last = plan.recvReduce(real(c), buf, acc, bytes, {last}, t);
      acc = buf;
    }
    int up = -1;
    if (node.parent >= 0) up = plan.send(real(node.parent), acc, bytes, {last}, t);
    if (node.parent < 0 && v != 0) {
      plan.send(root, acc, bytes, {last}, t);  // this tree's result, to `root`
    } else if (node.parent >= 0 && v == 0) {
      int top = 0;  // the virtual rank at the top of tree t
      while (doubleTree(top, size, t).parent >= 0) ++top;
      // Behind the bytes already sent up: buf may be this rank's partial sum or its input.
      plan.recvCopy(real(top), buf, bytes, {up}, t);
    }
  }
}

RangeNode binomialNode(int v, int size) {
  RangeNode n;
  int low = size;  // the root's children: every power of two below size
  if (v > 0) {
    low = v & -v;
    n.parent = v - low;
  }
  n.end = std::min(v + low, size);
  for (int k = 1; k < low; k <<= 1)
    if (v + k < size) n.children.insert(n.children.begin(), v + k);  // largest subtree first
  return n;
}

RangeNode chainNode(int v, int size) {
  RangeNode n;
  n.parent = v - 1;
  if (v + 1 < size) n.children.push_back(v + 1);
  n.end = size;
  return n;
}

int forwardedBlocks(RangeTree tree, int size) {
  int most = 0;
  for (int v = 1; v < size; ++v) most = std::max(most, tree(v, size).end - v - 1);
  return most;
}

void gatherBlocks(Plan& plan, int rank, int size, int root, RangeTree tree,
                  const RootedBlocks& blocks, const char* own, int ownReady,
                  const std::function<int(int)>& recvAfter) {
  if (size == 1) return;
  const int v = (rank - root + size) % size;
  auto real = [&](int x) { return (x + root) % size; };
  const RangeNode me = tree(v, size);
  std::vector<int> got(size_t(me.end - v), -1);
  // Each child sends its subtree's blocks in block order, its own first.
  for (int c : me.children)
    for (int b = c, end = tree(c, size).end; b < end; ++b)
      got[b - v] = plan.recvCopy(real(c), blocks.buf(b), blocks.bytes(b),
                                 {recvAfter ? recvAfter(b) : -1});
  if (me.parent < 0) return;
  plan.send(real(me.parent), own, blocks.bytes(v), {ownReady});
  for (int b = v + 1; b < me.end; ++b)
    plan.send(real(me.parent), blocks.buf(b), blocks.bytes(b), {got[b - v]});
}

void scatterBlocks(Plan& plan, int rank, int size, int root, RangeTree tree,
                   const RootedBlocks& blocks, char* own) {
  if (size == 1) return;
  const int v = (rank - root + size) % size;
  auto real = [&](int x) { return (x + root) % size; };
  const RangeNode me = tree(v, size);
  std::vector<int> got(size_t(me.end - v), -1);
  // Blocks of a subtree travel in reverse block order: the highest blocks are the largest
  // grandchild subtree's (the furthest from the root), and the own block, which goes no
  // further, comes last.
  if (me.parent >= 0)
    for (int b = me.end - 1; b >= v; --b)
      got[b - v] = plan.recvCopy(real(me.parent), b == v ? own : blocks.buf(b), blocks.bytes(b));
  for (int c : me.children)
    for (int b = tree(c, size).end - 1; b >= c; --b)
      plan.send(real(c), blocks.buf(b), blocks.bytes(b), {got[b - v]});
}

void rangeGather(Plan& plan, int rank, int size, int root, RangeTree tree, char* out,
                 const char* in, char* scratch, size_t count, size_t esize) {
  const size_t block = count * esize;
  if (block == 0) return;
  const int v = (rank - root + size) % size;
  if (v == 0) plan.copy(out + size_t(rank) * block, in, block);
  // The root receives each block into its rank's place in out; a forwarding rank keeps
  // blocks v+1, v+2, ... in scratch, in that order.
  RootedBlocks blocks{[&](int) { return block; }, [&](int b) {
                        return v == 0 ? out + size_t((b + root) % size) * block
                                      : scratch + size_t(b - v - 1) * block;
                      }};
  gatherBlocks(plan, rank, size, root, tree, blocks, in, -1);
}

void rangeScatter(Plan& plan, int rank, int size, int root, RangeTree tree, char* out,
                  const char* in, char* scratch, size_t count, size_t esize) {
  const size_t block = count * esize;
  if (block == 0) return;
  const int v = (rank - root + size) % size;
  if (v == 0) plan.copy(out, in + size_t(rank) * block, block);
  // The root sends from in (const_cast: only sends read its blocks).
  RootedBlocks blocks{[&](int) { return block; }, [&](int b) {
                        return v == 0 ? const_cast<char*>(in) + size_t((b + root) % size) * block
                                      : scratch + size_t(b - v - 1) * block;
                      }};
  scatterBlocks(plan, rank, size, root, tree, blocks, out);
}

void binomialGather(Plan& plan, int rank, int size, int root, char* out, const char* in,
                    char* scratch, size_t count, size_t esize) {
  rangeGather(plan, rank, size, root, binomialNode, out, in, scratch, count, esize);
}

void binomialScatter(Plan& plan, int rank, int size, int root, char* out, const char* in,
                     char* scratch, size_t count, size_t esize) {
  rangeScatter(plan, rank, size, root, binomialNode, out, in, scratch, count, esize);
}

}  // namespace pycomm
