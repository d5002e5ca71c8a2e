#include "common.h"

#include <cstring>
#include <sstream>

namespace pycomm {

size_t dtypeSize(DType t) {
  switch (t) {
    case DType::U8:
    case DType::I8:
    case DType::Bool: return 1;
    case DType::I16: return 2;
    case DType::F16:
    case DType::BF16: return 2;
    case DType::I32:
    case DType::F32: return 4;
    case DType::I64:
    case DType::F64: return 8;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(int(t)));
}

const char* dtypeName(DType t) {
  switch (t) {
    case DType::U8: return "uint8";
    case DType::I32: return "int32";
    case DType::I64: return "int64";
    case DType::F32: return "float32";
    case DType::F64: return "float64";
    case DType::F16: return "float16";
    case DType::BF16: return "bfloat16";
    case DType::I8: return "int8";
    case DType::I16: return "int16";
    case DType::Bool: return "bool";
  }
  return "?";
}

const char* redopName(RedOp op) {
  switch (op) {
    case RedOp::Sum: return "sum";
    case RedOp::Prod: return "prod";
    case RedOp::Min: return "min";
    case RedOp::Max: return "max";
    case RedOp::None: return "none";
    case RedOp::Avg: return "avg";
    case RedOp::Band: return "band";
    case RedOp::Bor: return "bor";
    case RedOp::Bxor: return "bxor";
  }
  return "?";
}

const char* collName(Coll c) {
  switch (c) {
    case Coll::AllReduce: return "all_reduce";
    case Coll::ReduceScatter: return "reduce_scatter";
    case Coll::AllGather: return "all_gather";
    case Coll::Broadcast: return "broadcast";
    case Coll::Barrier: return "barrier";
    case Coll::SendRecv: return "send/recv";
    case Coll::Reduce: return "reduce";
    case Coll::Gather: return "gather";
    case Coll::Scatter: return "scatter";
    case Coll::AllToAll: return "all_to_all";
  }
  return "?";
}

const char* algoName(Algo a) {
  switch (a) {
    case Algo::Ring: return "ring";
    case Algo::Tree: return "tree";
    case Algo::None: return "direct";
    case Algo::Pairwise: return "pairwise";
    case Algo::Exchange: return "exchange";
  }
  return "?";
}

bool sameOp(const OpDesc& a, const OpDesc& b) { return std::memcmp(&a, &b, sizeof(OpDesc)) == 0; }

std::string describe(const OpDesc& d) {
  std::ostringstream os;
  if (Coll(d.coll) == Coll::SendRecv) {
    os << "send/recv";
    if (d.seq) os << " #" << d.seq;
    if (d.root >= 0)
      os << " with rank " << d.root;
    else
      os << " with any rank";
    os << " (tag " << d.tag << ", " << d.count << " bytes)";
    return os.str();
  }
  os << collName(Coll(d.coll)) << " #" << d.seq << " (" << dtypeName(DType(d.dtype)) << " x "
     << d.count;
  if (RedOp(d.redop) != RedOp::None) os << ", " << redopName(RedOp(d.redop));
  if (d.root >= 0) os << ", root " << d.root;
  os << ", " << algoName(Algo(d.algo)) << ")";
  return os.str();
}

}  // namespace pycomm
