// Shared-memory transport for ranks on one host.
//
// Each rank owns one POSIX shared-memory segment (mode 0600) holding its control block and
// its outgoing channels: for every (peer, lane) a ring of `slots` pieces of up to
// `slotBytes` each, a head counter the sender advances and a tail counter the receiver
// advances.  Receivers read (or reduce) pieces straight out of the sender's slots, so a
// byte crosses shared memory once.  Slots are small enough to stay in cache between the
// writer and the reader.
//
// Set-up is three steps driven by the Python layer through the rendezvous store: create
// (own segment), attach (map every peer's), unlinkOwn (remove the name once every rank has
// mapped it).  After set-up no name is left in /dev/shm, so a crash cannot leak a segment;
// the mappings die with the processes.  Only this user's segments with mode 0600 are ever
// mapped, and every value read from a peer's memory is bounds-checked (README: Security).
#pragma once

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "reduce.h"
#include "transport/transport.h"

namespace pycomm {

struct ShmOptions {
  size_t slotBytes = 256 * 1024;  // payload of one piece
  int slots = 4;                  // pieces in flight per (peer, lane)
  int lanes = 3;                  // channels per peer: two trees (collectives.h), then messages
};

class ShmTransport final : public Transport {
 public:
  // Creates this rank's segment under `name` (must start with '/', must not exist).
  ShmTransport(int rank, int size, const std::string& name, ShmOptions opt);
  ~ShmTransport() override;
  ShmTransport(const ShmTransport&) = delete;
  ShmTransport& operator=(const ShmTransport&) = delete;

  // Maps every peer's segment; names[rank] is this rank's own.  Retries until `deadline`
  // while a peer has not created its segment yet.
  void attach(const std::vector<std::string>& names, Clock::time_point deadline);
  void unlinkOwn();
  // Removes segment `name` if this user owns it and the process that created it is gone
  // (a name left by a rank killed during start-up); true if it was removed.
  static bool reapIfStale(const std::string& name);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  int lanes() const override { return opt_.lanes; }
  const char* name() const override { return "shm"; }
  bool execute(Plan& plan, const OpDesc& desc, DType reduceType, RedOp op,
               Clock::time_point deadline, Clock::time_point returnBy,
               Clock::time_point since, const std::atomic<bool>* interrupt) override;
  bool peek(int peer, int lane, OpDesc* desc) override;
  void publish(const OpDesc& desc) override;
  void abort(const std::string& why) override;
  void checkPeers(const OpDesc& desc, int waitingOn) override;  // throws if a peer died or gave up
  std::string peerState(int peer) const override;
  [[noreturn]] void fail(const std::string& msg, int kind) override;

  // This rank leaves the group alive (destroy_process_group, process exit, torch's abort):
  // peers that still need it fail at once, naming it and `reason`, instead of waiting out
  // the timeout.  Peers that no longer need it (it finished its part) are not disturbed.
  void leave(const std::string& reason);
  // Peers that cannot take part any more, for shrink: group rank -> why (exited, left the
  // group, or stopped by a signal).  Ranks that merely failed (aborted) are alive.
  std::vector<std::pair<int, std::string>> gone() const;

  // Tests of the bounds checks: damages this rank's own segment the way a bug or a stray
  // writer could ("pid", "abort" or "counter"), so that its peers must notice.
  void corruptForTest(const std::string& what);

  // Single-copy transfers (cross-memory attach, process_vm_readv): a send of at least
  // `minBytes` (SIZE_MAX: never) hands the receiver the address of its bytes instead of
  // copying them into a slot, and the receiver reads (or reduces) them straight out of
  // the sender's memory.  Used only towards peers whose start-up probe could read this
  // rank's memory; the send is done once the receiver has taken its bytes.  Set before
  // attach(): SIZE_MAX also tells the peers not to hand this rank addresses.
  void setSingleCopy(size_t minBytes) { singleCopyFrom_ = minBytes < 1 ? 1 : minBytes; }
  size_t singleCopyFrom() const { return singleCopyFrom_; }
  // Whether this rank could read every peer's memory at start-up, and if not why not.
  bool canReadPeers() const { return canRead_; }
  const std::string& singleCopyWhy() const { return readWhy_; }
  // Bytes this rank has sent single-copy so far (tests check which path ran).
  uint64_t singleCopySent() const { return singleCopySent_; }

  // Threads this rank reduces a received piece with (reduce.h's ReducePool); set while no
  // collective runs.
  void setReduceThreads(int threads) { reducer_ = std::make_unique<ReducePool>(threads); }
  int reduceThreads() const { return reducer_->threads(); }

 private:
  struct Mapping {
    char* base = nullptr;
    size_t bytes = 0;
  };
  struct Header;
  struct Channel;
  class Progress;

  Header* header(int r) const;
  Channel* channel(int owner, int dst, int lane) const;
  char* slot(int owner, int dst, int lane, uint64_t index) const;
  struct Blame {
    int rank = -1;          // the rank at fault, -1 if none could be named
    std::string why;        // "rank 2 (pid 123) is stopped (...) in the middle of all_reduce #3 (...)"
    std::vector<int> path;  // the ranks followed from the one waited for to `rank`
    int by = -1;            // the rank that found it (-1: this one)
    bool relayed = false;   // the last rank of `path` gave up and `why` is what it found
  };

  bool trySend(int peer, int lane, const OpDesc& desc, const char* data, size_t n);
  // Single copy: posts the address of `n` bytes at `data` (remote != 0 in the piece).
  bool tryPost(int peer, int lane, const OpDesc& desc, const char* data, size_t n);
  // Reads `n` bytes at `remote` in `peer`'s memory into `dst`; fails naming the peer.
  void readPeer(int peer, const OpDesc& desc, char* dst, uint64_t remote, size_t n);
  void probePeers();  // attach(): can this rank read every peer's memory?
  // Whether send task `i` of `plan` goes single-copy (decided at its first piece).
  bool singleCopyTask(const Plan& plan, const OpDesc& desc, size_t i);
  void usable() const;  // throws once this communicator has failed
  bool run(Plan& plan, const OpDesc& desc, DType reduceType, RedOp op, Clock::time_point deadline,
           Clock::time_point returnBy, Clock::time_point since, const std::atomic<bool>* interrupt);
  // Peers the unfinished part of `tasks` still waits on: a send to them, or a receive from
  // them whose channel holds nothing.  Only these can fail the collective by going away.
  std::vector<char> neededPeers(const std::vector<Task>& tasks) const;
  void confirmArrival(const OpDesc& desc, const std::vector<Task>& tasks, Progress& progress);
  // Throws if a needed peer died, left or gave up, this rank was aborted from another
  // thread, or a peer called another collective under this sequence number.
  void checkPeers(const OpDesc& desc, const std::vector<char>& needed);
  // Follows who waits for whom from `first` to the rank that is actually late.
  Blame follow(int first) const;
  std::string activity(int peer) const;    // " in the middle of all_reduce #3 (...)"
  std::string goneWhy(int peer) const;     // why `peer` cannot take part any more, "" if it can
  void setWaiting(int peer);               // what peers read in this rank's header
  [[noreturn]] void fail(const std::string& msg, int kind, const Blame& blame);
  [[noreturn]] void corrupted(int peer, const std::string& what);

  int rank_, size_;
  ShmOptions opt_;
  std::string name_;
  bool unlinked_ = false;
  size_t bytes_ = 0;
  std::vector<Mapping> maps_;         // one per rank; maps_[rank_] is our own segment
  std::vector<uint64_t> sendHead_;    // cached copies of the counters we own
  std::vector<uint64_t> recvTail_;
  std::string failure_;               // set once this communicator has failed
  int waiting_ = -1;                  // cached copy of this rank's published waitingOn

  // Single copy.  inflight_[channel]: the single-copy pieces posted and not yet taken,
  // oldest first (slot pieces are done once posted).  posted_/viaPeer_: per task of the
  // plan being executed, kept while one plan is resumed.
  size_t singleCopyFrom_ = SIZE_MAX;
  uint64_t singleCopySent_ = 0;
  bool canRead_ = false;
  std::string readWhy_ = "not probed";
  struct InFlight {
    uint64_t piece;  // its index on the channel: taken once the receiver's tail passes it
    int task;
    size_t bytes;
  };
  std::vector<std::deque<InFlight>> inflight_;
  std::vector<size_t> posted_;
  std::vector<signed char> viaPeer_;  // -1 undecided, 0 slots, 1 single copy
  std::unique_ptr<ReducePool> reducer_ = std::make_unique<ReducePool>(1);
  const Plan* planOf_ = nullptr;
  uint64_t planSeq_ = 0;
  std::vector<char> bounce_;  // a received piece to reduce, read out of the sender's memory
  // run()'s per-channel task queues, kept between calls: allocating them on every call
  // is a measurable part of a small collective.
  std::vector<std::vector<int>> sendQ_, recvQ_;
  std::vector<size_t> sHead_, rHead_;
};

}  // namespace pycomm
