#include "algorithms/cost.h"

#include <algorithm>
#include <cctype>
#include <sstream>
#include <stdexcept>

#include "algorithms/algorithms.h"

namespace pycomm {

int treeDepth(int size) {
  int depth = 0;
  for (int r = 0; r < size; ++r) {
    int d = 0;
    for (int x = binaryTree(r, size).parent; x >= 0; x = binaryTree(x, size).parent) ++d;
    depth = std::max(depth, d);
  }
  return depth;
}

double predict(const CostModel& m, Coll coll, Algo algo, double n, int p) {
  if (p <= 1) return 0.0;
  const double a = m.alpha, b = m.beta, g = m.gamma, f = double(p - 1) / p;
  if (algo == Algo::Ring) {
    switch (coll) {
      case Coll::AllReduce: return 2 * (p - 1) * a + 2 * f * n * b + f * n * g;
      case Coll::ReduceScatter: return (p - 1) * a + f * n * b + f * n * g;
      case Coll::AllGather: return (p - 1) * a + f * n * b;
      case Coll::Broadcast: return (p - 1) * a + n * b;
      default: break;
    }
  } else if (algo == Algo::Tree) {
    // The busiest tree rank takes two children's halves in and sends two halves out.
    const double d = treeDepth(p);
    switch (coll) {
      case Coll::AllReduce:
      case Coll::ReduceScatter: return 2 * d * a + 2 * n * b + n * g;
      case Coll::AllGather: return 2 * d * a + 2 * n * b;
      case Coll::Broadcast: return d * a + 2 * n * b;
      default: break;
    }
  }
  throw std::invalid_argument(std::string("no cost formula for ") + collName(coll) + " with " +
                              algoName(algo));
}

Algo choose(const CostModel& m, Coll coll, double bytes, int size) {
  return predict(m, coll, Algo::Tree, bytes, size) < predict(m, coll, Algo::Ring, bytes, size)
             ? Algo::Tree
             : Algo::Ring;
}

namespace {
std::string lower(std::string s) {
  std::string out;
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c)) && c != '_') out += char(std::tolower(c));
  return out;
}
Algo parseAlgo(const std::string& s, const std::string& setting) {
  if (s == "ring") return Algo::Ring;
  if (s == "tree") return Algo::Tree;
  if (s == "auto" || s.empty()) return Algo::None;
  throw std::invalid_argument("PYCOMM_ALGO=" + setting + ": unknown algorithm '" + s +
                              "'; use ring, tree or auto, optionally per collective as in "
                              "'allreduce:tree;allgather:ring'");
}
}  // namespace

Algo algoOverride(const std::string& setting, Coll coll) {
  std::string s = lower(setting);
  if (s.find(':') == std::string::npos) return parseAlgo(s, setting);
  const char* want = nullptr;
  switch (coll) {
    case Coll::AllReduce: want = "allreduce"; break;
    case Coll::ReduceScatter: want = "reducescatter"; break;
    case Coll::AllGather: want = "allgather"; break;
    case Coll::Broadcast: want = "broadcast"; break;
    default: return Algo::None;
  }
  Algo found = Algo::None;
  std::stringstream parts(s);
  std::string part;
  while (std::getline(parts, part, ';')) {
    if (part.empty()) continue;
    auto colon = part.find(':');
    if (colon == std::string::npos) throw std::invalid_argument("PYCOMM_ALGO=" + setting + ": '" + part +
                                                                "' lacks 'collective:algorithm'");
    std::string name = part.substr(0, colon);
    if (name != "allreduce" && name != "reducescatter" && name != "allgather" && name != "broadcast")
      throw std::invalid_argument("PYCOMM_ALGO=" + setting + ": unknown collective '" + name +
                                  "'; use allreduce, reducescatter, allgather or broadcast");
    Algo a = parseAlgo(part.substr(colon + 1), setting);
    if (name == want) found = a;
  }
  return found;
}

}  // namespace pycomm
