// Plans cut into global rounds, for transports that move whole messages with matched,
// grouped sends and receives (NCCL's ncclSend/ncclRecv inside ncclGroupStart/End).
//
// The shared-memory transport runs a plan as a dataflow: each task moves bytes as soon as
// its dependencies allow.  A grouped transport cannot: a group is launched as a unit and
// completes only when all of its sends and receives have completed.  Grouping each rank's
// ready tasks by itself deadlocks (a tree's leaf waits for its parent's downward send,
// which the parent launches only after a group that waits for the leaf's next upward
// send).  So the rounds are computed for all ranks at once, bulk-synchronously: a send and
// its matching receive always fall in the same round on both ranks, and a task falls in a
// round later than everything it depends on.  Round r of every rank then completes with
// the others' round r, and nothing waits on a later round.
//
// Tasks are cut into pieces of at most `pieceBytes`; a streaming dependency (same size,
// plan.h) becomes a dependency of piece j on piece j, and a task moves one piece per
// round, so a ring or a tree pipelines across rounds instead of moving each chunk whole,
// and a round's scratch for reductions is a few pieces, not whole chunks.
#pragma once

#include <cstddef>
#include <functional>
#include <vector>

#include "algorithms/plan.h"

namespace pycomm {

struct RoundOp {
  int task;            // index into the rank's plan
  size_t offset;       // first byte of the piece within the task
  size_t bytes;
  size_t scratch;      // RecvReduce: where the piece lands before it is reduced
};

struct Rounds {
  std::vector<std::vector<RoundOp>> rounds;  // in each round: sorted by (peer, lane, order)
  size_t scratchBytes = 0;                   // for RecvReduce pieces of one round
};

// The plan of any rank (the algorithm's call with that rank; pointers may be anything,
// the structure of a plan does not depend on them).
using PlanOf = std::function<void(Plan&, int rank)>;

// Rounds of every rank.  Throws std::logic_error if the plans do not match (a send whose
// receive is missing or of another size): that is a bug in an algorithm.
std::vector<Rounds> scheduleRounds(int size, const PlanOf& planOf, size_t pieceBytes);


}  // namespace pycomm
