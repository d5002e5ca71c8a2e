#include "algorithms/cost.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "algorithms/algorithms.h"
#include "algorithms/collectives.h"

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
  return algorithm(collective(coll), algo).cost(m, n, p);
}

Algo choose(const CostModel& m, Coll coll, double bytes, int size) {
  const Collective& c = collective(coll);
  Algo best = c.algos.front().algo;  // ties go to the first (ring before tree)
  double bestTime = predict(m, coll, best, bytes, size);
  for (const AlgoEntry& e : c.algos) {
    double t = predict(m, coll, e.algo, bytes, size);
    if (t < bestTime) best = e.algo, bestTime = t;
  }
  return best;
}

size_t singleCopyFrom(double alpha, double beta, double copyAlpha, double copyBeta) {
  if (copyAlpha <= alpha && copyBeta <= beta) return 1;  // never dearer
  if (copyBeta >= beta) return SIZE_MAX;                 // dearer per byte: loses for large n
  const double n = std::ceil((copyAlpha - alpha) / (beta - copyBeta));
  return n >= double(SIZE_MAX) ? SIZE_MAX : std::max<size_t>(1, size_t(n));
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
  if (s == "pairwise") return Algo::Pairwise;
  if (s == "exchange") return Algo::Exchange;
  if (s == "auto" || s.empty()) return Algo::None;
  throw std::invalid_argument("PYCOMM_ALGO=" + setting + ": unknown algorithm '" + s +
                              "'; use ring, tree, exchange, pairwise or auto, optionally per collective "
                              "as in 'allreduce:tree;allgather:ring'");
}
bool has(const Collective& c, Algo a) {
  for (const AlgoEntry& e : c.algos)
    if (e.algo == a) return true;
  return false;
}
}  // namespace

Algo algoOverride(const std::string& setting, Coll coll) {
  std::string s = lower(setting);
  const Collective& row = collective(coll);
  if (s.find(':') == std::string::npos) {
    // One algorithm for every collective applies to those that have it (all_to_all has
    // neither ring nor tree); the others stay with the cost model.
    Algo a = parseAlgo(s, setting);
    return has(row, a) ? a : Algo::None;
  }
  const char* want = row.setting;
  std::string names;
  for (const Collective& c : collectives())
    if (c.setting) names += std::string(names.empty() ? "" : ", ") + c.setting;
  Algo found = Algo::None;
  std::stringstream parts(s);
  std::string part;
  while (std::getline(parts, part, ';')) {
    if (part.empty()) continue;
    auto colon = part.find(':');
    if (colon == std::string::npos) throw std::invalid_argument("PYCOMM_ALGO=" + setting + ": '" + part +
                                                                "' lacks 'collective:algorithm'");
    std::string name = part.substr(0, colon);
    const Collective* named = nullptr;
    for (const Collective& c : collectives())
      if (c.setting && name == c.setting) named = &c;
    if (!named)
      throw std::invalid_argument("PYCOMM_ALGO=" + setting + ": unknown collective '" + name +
                                  "'; use one of " + names);
    Algo a = parseAlgo(part.substr(colon + 1), setting);
    if (a != Algo::None && !has(*named, a)) {
      std::string algos;
      for (const AlgoEntry& e : named->algos) algos += std::string(algos.empty() ? "" : ", ") + algoName(e.algo);
      throw std::invalid_argument("PYCOMM_ALGO=" + setting + ": " + named->name + " has no " +
                                  algoName(a) + " algorithm; use " + algos + " or auto");
    }
    if (want && name == want) found = a;
  }
  return found;
}

}  // namespace pycomm
