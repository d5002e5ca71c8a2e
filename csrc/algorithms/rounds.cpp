// Bulk-synchronous rounds for grouped transports: see rounds.h for why they are computed
// for all ranks at once.
#include "algorithms/rounds.h"

#include <algorithm>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>

#include "algorithms/algorithms.h"

namespace pycomm {

namespace {

struct Node {  // one piece of one task of one rank
  int rank, task, piece;
};

size_t piecesOf(const Task& t, size_t pieceBytes) {
  return t.bytes == 0 ? 1 : (t.bytes + pieceBytes - 1) / pieceBytes;
}

}  // namespace

std::vector<Rounds> scheduleRounds(int size, const PlanOf& planOf, size_t pieceBytes) {
  if (pieceBytes == 0) throw std::invalid_argument("pieceBytes must be positive");
  std::vector<Plan> plans(size);
  for (int r = 0; r < size; ++r) planOf(plans[r], r);

  // level[r][t][j]: the round of piece j of task t of rank r.
  std::vector<std::vector<std::vector<int>>> level(size);
  // Channel order: (from, to, lane) -> the pieces sent, and (to, from, lane) -> received.
  using Key = std::tuple<int, int, int>;
  std::map<Key, std::vector<Node>> sends, recvs;
  // position of each node in its channel (the order NCCL matches sends and receives in)
  std::vector<std::vector<std::vector<int>>> pos(size);
  for (int r = 0; r < size; ++r) {
    const auto& tasks = plans[r].tasks();
    level[r].resize(tasks.size());
    pos[r].resize(tasks.size());
    for (int t = 0; t < int(tasks.size()); ++t) {
      const Task& k = tasks[t];
      if (k.optional) throw std::logic_error("grouped transports carry no optional tasks");
      size_t n = piecesOf(k, pieceBytes);
      level[r][t].assign(n, 0);
      pos[r][t].resize(n);
      auto& ch = k.kind == Task::Send ? sends[{r, k.peer, k.lane}] : recvs[{r, k.peer, k.lane}];
      for (size_t j = 0; j < n; ++j) {
        pos[r][t][j] = int(ch.size());
        ch.push_back({r, t, int(j)});
      }
    }
  }
  // Each piece's partner on the other rank.
  std::vector<std::vector<std::vector<Node>>> partner(size);
  for (int r = 0; r < size; ++r) {
    partner[r].resize(level[r].size());
    for (size_t t = 0; t < level[r].size(); ++t) partner[r][t].resize(level[r][t].size());
  }
  auto pieceBytesOf = [&](const Node& n) {
    const Task& k = plans[n.rank].tasks()[n.task];
    size_t off = size_t(n.piece) * pieceBytes;
    return k.bytes == 0 ? 0 : std::min(pieceBytes, k.bytes - off);
  };
  for (auto& [key, s] : sends) {
    auto [from, to, lane] = key;
    auto it = recvs.find({to, from, lane});
    size_t have = it == recvs.end() ? 0 : it->second.size();
    if (have != s.size())
      throw std::logic_error("plans disagree: rank " + std::to_string(from) + " sends " +
                             std::to_string(s.size()) + " pieces to rank " + std::to_string(to) +
                             " on lane " + std::to_string(lane) + ", which receives " +
                             std::to_string(have));
    for (size_t i = 0; i < s.size(); ++i) {
      const Node &a = s[i], &b = it->second[i];
      if (pieceBytesOf(a) != pieceBytesOf(b))
        throw std::logic_error("plans disagree on the size of a message from rank " +
                               std::to_string(from) + " to rank " + std::to_string(to));
      partner[a.rank][a.task][a.piece] = b;
      partner[b.rank][b.task][b.piece] = a;
    }
  }
  for (auto& [key, rv] : recvs) {
    auto [to, from, lane] = key;
    if (!sends.count({from, to, lane}))
      throw std::logic_error("plans disagree: rank " + std::to_string(to) + " receives from rank " +
                             std::to_string(from) + ", which sends nothing");
  }

  // Relax to the least fixed point: local lower bounds (after dependencies, after the
  // task's previous piece), then partners share the later of their two rounds.  Channels
  // need no order of their own across rounds: a message and its receive share a round,
  // and inside a round both sides post in channel order.  Every
  // pass either raises a level or ends; a cycle (a plan that would deadlock) raises levels
  // without end, so the number of passes is bounded.
  size_t nodes = 0;
  for (int r = 0; r < size; ++r)
    for (auto& t : level[r]) nodes += t.size();
  for (size_t pass = 0;; ++pass) {
    if (pass > 4 * nodes + 10) throw std::logic_error("plans deadlock: no round order exists");
    bool changed = false;
    for (int r = 0; r < size; ++r) {
      const auto& tasks = plans[r].tasks();
      for (int t = 0; t < int(tasks.size()); ++t) {
        const Task& k = tasks[t];
        for (int j = 0; j < int(level[r][t].size()); ++j) {
          int lv = level[r][t][j];
          for (int d = 0; d < k.ndeps; ++d) {
            const auto& dl = level[r][k.deps[d]];
            bool streams = tasks[k.deps[d]].bytes == k.bytes;
            int dj = streams ? std::min<int>(j, int(dl.size()) - 1) : int(dl.size()) - 1;
            lv = std::max(lv, dl[dj] + 1);
          }
          // One piece of a task per round: that is what bounds the scratch a round needs
          // and makes the pieces a pipeline rather than a burst.
          if (j > 0) lv = std::max(lv, level[r][t][j - 1] + 1);
          const Node& p = partner[r][t][j];
          lv = std::max(lv, level[p.rank][p.task][p.piece]);
          if (lv != level[r][t][j]) {
            level[r][t][j] = lv;
            changed = true;
          }
          level[p.rank][p.task][p.piece] = std::max(level[p.rank][p.task][p.piece], lv);
        }
      }
    }
    if (!changed) break;
  }

  std::vector<Rounds> out(size);
  for (int r = 0; r < size; ++r) {
    const auto& tasks = plans[r].tasks();
    std::map<int, std::vector<std::tuple<int, int, int, RoundOp>>> byLevel;
    for (int t = 0; t < int(tasks.size()); ++t) {
      const Task& k = tasks[t];
      if (k.bytes == 0) continue;  // both sides skip an empty message
      for (int j = 0; j < int(level[r][t].size()); ++j) {
        size_t off = size_t(j) * pieceBytes;
        RoundOp op{t, off, std::min(pieceBytes, k.bytes - off), 0};
        // Same order on both sides of every channel: by peer, then lane, then position.
        byLevel[level[r][t][j]].push_back({k.peer, k.lane, pos[r][t][j], op});
      }
    }
    for (auto& [lv, ops] : byLevel) {
      std::sort(ops.begin(), ops.end(), [](const auto& a, const auto& b) {
        return std::tie(std::get<0>(a), std::get<1>(a), std::get<2>(a)) <
               std::tie(std::get<0>(b), std::get<1>(b), std::get<2>(b));
      });
      std::vector<RoundOp> round;
      size_t scratch = 0;
      for (auto& o : ops) {
        RoundOp op = std::get<3>(o);
        if (tasks[op.task].kind == Task::RecvReduce) {
          op.scratch = scratch;
          scratch += (op.bytes + 255) / 256 * 256;
        }
        round.push_back(op);
      }
      out[r].scratchBytes = std::max(out[r].scratchBytes, scratch);
      out[r].rounds.push_back(std::move(round));
    }
  }
  return out;
}

}  // namespace pycomm
