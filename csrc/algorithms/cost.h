// The alpha-beta cost model: its constants, and choosing the cheapest of a collective's
// algorithms by the formulas in its row of the collective table (collectives.h).
#pragma once

#include <cstddef>
#include <string>

#include "common.h"

namespace pycomm {

struct CostModel {
  double alpha = 4e-6;       // seconds per step
  double beta = 1.0 / 6e9;   // seconds per byte moved
  double gamma = 1.0 / 12e9; // seconds per byte reduced
};

int treeDepth(int size);
// Predicted seconds of `coll` with `algo` on `size` ranks for `bytes` (the row's buffer).
double predict(const CostModel& m, Coll coll, Algo algo, double bytes, int size);
Algo choose(const CostModel& m, Coll coll, double bytes, int size);

// The shared-memory transport's two protocols for one send of n bytes: through the slots,
// alpha + n beta (the sender copies into a slot, the receiver out of it), or single copy,
// copyAlpha + n copyBeta (the receiver reads the sender's buffer; the sender waits until
// it has).  Returns the smallest n for which single copy is cheaper, SIZE_MAX if none.
size_t singleCopyFrom(double alpha, double beta, double copyAlpha, double copyBeta);

// PYCOMM_ALGO: "ring", "tree", or per collective like NCCL_ALGO:
// "allreduce:tree;allgather:ring" (names: the rows' `setting`).  A single algorithm applies
// to the collectives that have it.  Returns Algo::None when the setting leaves `coll` to
// the cost model; throws std::invalid_argument on a malformed setting or one that names
// an algorithm its collective lacks.
Algo algoOverride(const std::string& setting, Coll coll);

}  // namespace pycomm
