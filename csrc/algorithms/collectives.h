// The collective table: one row per collective, read by everything that needs to know
// about collectives (the communicator, the rounds of grouped transports, the cost model,
// PYCOMM_ALGO, and the codes pycomm._C exports to Python).  Adding a collective is one
// row here, its plan builders in the algorithm files and one public function in Python.
#pragma once

#include <cstddef>
#include <vector>

#include "algorithms/cost.h"
#include "algorithms/plan.h"
#include "common.h"

namespace pycomm {

// Two lanes carry the two trees of the double binary tree; a transport gives every
// collective these two and keeps any further lane for point-to-point messages.
constexpr int kCollectiveLanes = 2;

// One collective call as the algorithms see it: raw buffers, counts in elements.
struct CollArgs {
  Coll coll;
  Algo algo;
  int size;
  char* out;           // the result (broadcast: the buffer, in place)
  const char* in;      // this rank's input (may equal out where the row allows it)
  char* scratch;       // Collective::scratch bytes, owned by the caller
  size_t count;        // elements; what they count is the row's `count` text
  size_t esize;        // bytes per element
  int root = -1;       // rooted collectives: the root's rank
  const size_t* sendCounts = nullptr;  // all_to_all: elements to each rank (size entries)
  const size_t* recvCounts = nullptr;  // all_to_all: elements from each rank
};

using PlanFn = void (*)(Plan&, int rank, const CollArgs&);
// Predicted seconds for `bytes` (the whole buffer, see Collective::bytes) on p ranks.
using CostFn = double (*)(const CostModel&, double bytes, int p);

struct AlgoEntry {
  Algo algo;
  const char* formula;  // the cost as text (pycomm model prints it)
  PlanFn plan;
  CostFn cost;
};

struct Collective {
  Coll coll;
  const char* name;      // "all_reduce": Python's name and the one in messages
  const char* setting;   // its key in PYCOMM_ALGO ("allreduce"), nullptr if not selectable
  bool reduces;          // takes a reduction op
  bool rooted;           // takes a root
  const char* count;     // what CollArgs::count counts
  const char* bytes;     // which buffer the cost model's bytes are
  size_t (*scratch)(const CollArgs&);  // scratch bytes the plan needs
  std::vector<AlgoEntry> algos;        // the cost model picks the cheapest
};

const std::vector<Collective>& collectives();
const Collective& collective(Coll c);  // throws std::invalid_argument for unknown codes
const AlgoEntry& algorithm(const Collective& c, Algo a);  // throws if c has no such algorithm

// This rank's plan for the call (the row's plan for a.algo).
void collectivePlan(Plan& plan, int rank, const CollArgs& a);
size_t collectiveScratch(const CollArgs& a);

}  // namespace pycomm
