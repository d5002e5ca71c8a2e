// Types shared by algorithms, transports and bindings: element types, reduction ops,
// collective descriptors and the errors every layer raises.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace pycomm {

// pycomm._C exports every code by name (bindings.cpp), so Python never copies them.
enum class DType : int32_t {
  U8 = 0, I32 = 1, I64 = 2, F32 = 3, F64 = 4, F16 = 5, BF16 = 6, I8 = 7, I16 = 8, Bool = 9
};
constexpr int kNumDTypes = 10;
// Avg travels as itself (so that ranks mixing sum and avg are told), is reduced as Sum,
// and the Python layer divides.  The bitwise ops are for integer and bool types.
enum class RedOp : int32_t {
  Sum = 0, Prod = 1, Min = 2, Max = 3, None = 4, Avg = 5, Band = 6, Bor = 7, Bxor = 8
};
constexpr int kNumRedOps = 9;
enum class Coll : int32_t {
  AllReduce = 0, ReduceScatter = 1, AllGather = 2, Broadcast = 3, Barrier = 4, SendRecv = 5,
  Reduce = 6, Gather = 7, Scatter = 8, AllToAll = 9
};
// None: "left to the cost model" where an algorithm is chosen, and the algorithm of
// messages that have none (send/recv).  Pairwise is all-to-all's only algorithm;
// Exchange is all-reduce's recursive doubling (pairwise.cpp).
enum class Algo : int32_t { Ring = 0, Tree = 1, None = 2, Pairwise = 3, Exchange = 4 };

size_t dtypeSize(DType t);
const char* dtypeName(DType t);
const char* redopName(RedOp op);
const char* collName(Coll c);
const char* algoName(Algo a);

// Identifies one collective call.  Every piece a transport carries holds the sender's
// descriptor, and every rank publishes the one it is executing, so that ranks calling
// different collectives (or the same one with other sizes) find out instead of exchanging
// the wrong bytes.
struct OpDesc {
  uint64_t seq = 0;     // per-communicator sequence number (per peer pair for send/recv)
  uint64_t count = 0;   // elements per rank (per rank's block for reduce-scatter/all-gather)
  int32_t coll = 0;
  int32_t dtype = 0;
  int32_t redop = 0;
  int32_t algo = 0;
  int32_t root = -1;    // rooted collectives (broadcast, reduce, gather, scatter): the root
  int32_t tag = 0;      // point-to-point messages: the message's tag (0 for collectives)
};
static_assert(sizeof(OpDesc) == 40, "OpDesc is shared between processes");

bool sameOp(const OpDesc& a, const OpDesc& b);
// "all_reduce #12 (float32 x 1000, sum, ring)"; for a message, "send/recv #3 with rank 1
// (tag 2, 40 bytes)": count is its size in bytes, root the peer (-1: any rank), no #seq if 0.
std::string describe(const OpDesc& d);

using Clock = std::chrono::steady_clock;

// One pause of a spin-wait loop (the CPU's spin hint).
inline void cpuRelax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Base of all communication failures; the subclasses let Python tell them apart.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
class TimeoutError : public CommError {  // a peer did not make progress within the timeout
 public:
  using CommError::CommError;
};
class MismatchError : public CommError {  // ranks called different collectives
 public:
  using CommError::CommError;
};

}  // namespace pycomm
