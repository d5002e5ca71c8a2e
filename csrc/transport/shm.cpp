#include "transport/shm.h"

#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cerrno>
#include <cstring>
#include <ctime>
#include <fstream>
#include <sstream>
#include <thread>

#include "reduce.h"

namespace pycomm {

namespace {

// "pycomm03": the header grew the fields of single-copy transfers (where it is mapped in
// its owner, whether its owner can read its peers); a segment of an older build is not
// mistaken for one of this layout.
constexpr uint64_t kMagic = 0x33306d6d6f637970ULL;
constexpr size_t kPieceHeader = 64;
constexpr size_t kHeaderBytes = 4096;

struct PieceHeader {
  OpDesc desc;
  uint64_t bytes;
  uint64_t remote;  // 0: the bytes follow in the slot; else their address in the sender
};
static_assert(sizeof(PieceHeader) <= kPieceHeader, "piece header fits its slot prefix");

inline uint64_t loadAcquire(const uint64_t* p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
inline void storeRelease(uint64_t* p, uint64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

// Field 22 of /proc/<pid>/stat (start time in clock ticks) and the state letter: together
// with the pid they tell a live peer from a dead one, a zombie, or a recycled pid.
bool procStat(int64_t pid, char* state, uint64_t* startTime) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
  std::string s;
  if (!f || !std::getline(f, s)) return false;
  auto close = s.rfind(')');  // the command name may contain spaces and parentheses
  if (close == std::string::npos) return false;
  std::istringstream rest(s.substr(close + 2));
  std::string field;
  rest >> *state;
  for (int i = 4; i <= 22 && rest >> field; ++i)
    if (i == 22) *startTime = std::stoull(field);
  return true;
}

std::string errnoText(const std::string& what) { return what + ": " + std::strerror(errno); }

// The state letter of /proc/<pid>/stat ('R', 'S', 'T' stopped, 't' traced, ...), 0 if unknown.
char processState(int64_t pid) {
  char state = 0;
  uint64_t start = 0;
  return procStat(pid, &state, &start) ? state : 0;
}

// Steady-clock nanoseconds: CLOCK_MONOTONIC, one clock for every process of the host, so
// a peer's timestamps can be compared with ours.
uint64_t nowNs() {
  return uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count());
}

std::string secondsAgo(uint64_t thenNs) {
  uint64_t now = nowNs();
  std::ostringstream os;
  os.precision(2);
  os << std::fixed << (thenNs && now > thenNs ? double(now - thenNs) * 1e-9 : 0.0) << " s";
  return os.str();
}

// A string a peer wrote: at most `n` bytes, NUL-terminated or not.
std::string peerText(const char* p, size_t n) { return std::string(p, strnlen(p, n)); }

// Whether process `pid`, started at `startTime` (0: unknown), still runs.
bool processAlive(int64_t pid, uint64_t startTime) {
  char state = '?';
  uint64_t start = 0;
  bool alive = kill(pid_t(pid), 0) == 0 || errno == EPERM;
  if (alive && procStat(pid, &state, &start))
    alive = state != 'Z' && state != 'X' && (startTime == 0 || start == startTime);
  return alive;
}

}  // namespace

struct alignas(64) ShmTransport::Header {
  uint64_t magic;
  int32_t rank, size, lanes, slots;
  uint64_t slotBytes;
  int64_t pid;
  uint64_t startTime;
  alignas(64) uint32_t aborted;
  // With `aborted`: the rank at fault as this rank learnt it (-1: none named, e.g. a
  // mismatch), what it was doing, and the rank that found it.  Passed on unchanged when a
  // peer stops because of this rank, so every error names the culprit, not the messenger.
  int32_t blame;
  int32_t blameBy;
  char abortMsg[1024];
  char blameWhy[512];
  // What this rank is executing (`pub`) and the last collective it started (`coll`; `pub`
  // may be a point-to-point message), written under a sequence lock (odd while written).
  alignas(64) uint64_t pubVersion;
  OpDesc pub;
  OpDesc coll;
  // Where this rank stands, for peers that time out waiting on it and follow who waits for
  // whom.  Read without a lock: it only explains a failure.  Times are nowNs().
  alignas(64) int32_t waitingOn;  // the rank it waits for now, -1 none
  uint32_t inOp;                  // 1 while it executes `pub`
  uint64_t sinceNs;               // when it last entered or left `pub`
  uint64_t beatNs;                // its last sign of life inside the transport
  // Set once this rank left the group alive (ShmTransport::leave).
  alignas(64) uint32_t left;
  char leftWhy[128];
  // Single copy: this header's address in its owner's memory (what a peer's start-up probe
  // reads), and 1 once its owner could read every peer's memory (so peers may hand it
  // addresses instead of bytes).
  alignas(64) uint64_t base;
  uint32_t canRead;
};

// head and tail on separate cache lines: the sender writes one, the receiver the other.
struct alignas(64) ShmTransport::Channel {
  uint64_t head;
  char pad0[56];
  uint64_t tail;
  char pad1[56];
};

ShmTransport::ShmTransport(int rank, int size, const std::string& name, ShmOptions opt)
    : rank_(rank), size_(size), opt_(opt), name_(name), maps_(size),
      sendHead_(size_t(size) * opt.lanes, 0), recvTail_(size_t(size) * opt.lanes, 0) {
  if (size < 1 || rank < 0 || rank >= size)
    throw std::invalid_argument("rank " + std::to_string(rank) + " is not in [0, " +
                                std::to_string(size) + ")");
  if (opt.slots < 2 || opt.lanes < 1 || opt.slotBytes < 4096 || opt.slotBytes % 64)
    throw std::invalid_argument("shm options need slots >= 2, lanes >= 1 and a slot size "
                                "that is a multiple of 64 bytes, at least 4096");
  size_t nch = size_t(size) * opt.lanes;
  bytes_ = kHeaderBytes + nch * sizeof(Channel) + nch * opt.slots * (kPieceHeader + opt.slotBytes);

  // O_EXCL: a name that exists already (another job, or another user who guessed it) is
  // never reused; O_NOFOLLOW: never through a link.
  int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR | O_NOFOLLOW, 0600);
  if (fd < 0) {
    if (errno == EEXIST) {
      struct stat st;
      std::string owner;
      int other = shm_open(name.c_str(), O_RDONLY | O_NOFOLLOW, 0);
      if (other >= 0 && fstat(other, &st) == 0) owner = " (owned by uid " + std::to_string(st.st_uid) + ")";
      if (other >= 0) close(other);
      throw CommError("pycomm: rank " + std::to_string(rank) + " cannot create its shared-memory segment " +
                      name + ": the name exists already" + owner +
                      ". Another process took this job's name, possibly another user reading the "
                      "rendezvous store; start the job again (and see the README's security section)");
    }
    throw CommError(errnoText("shm_open(" + name + ")"));
  }
  if (ftruncate(fd, off_t(bytes_)) != 0) {
    int e = errno;
    close(fd);
    shm_unlink(name.c_str());
    errno = e;
    throw CommError(errnoText("ftruncate(" + name + ") to " + std::to_string(bytes_) +
                              " bytes (is /dev/shm large enough?)"));
  }
  void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  close(fd);
  if (p == MAP_FAILED) {
    shm_unlink(name.c_str());
    throw CommError(errnoText("mmap(" + name + ")"));
  }
  maps_[rank] = {static_cast<char*>(p), bytes_};
  static_assert(sizeof(Header) <= kHeaderBytes, "the header fits its page");
  Header* h = header(rank);  // ftruncate zero-fills: only non-zero fields need writing
  h->rank = rank;
  h->size = size;
  h->lanes = opt.lanes;
  h->slots = opt.slots;
  h->slotBytes = opt.slotBytes;
  h->pid = getpid();
  char state;
  uint64_t start = 0;
  procStat(h->pid, &state, &start);
  h->startTime = start;
  h->blame = h->blameBy = h->waitingOn = -1;
  h->sinceNs = h->beatNs = nowNs();
  h->base = reinterpret_cast<uint64_t>(h);
  inflight_.resize(size_t(size) * opt.lanes);
  storeRelease(&h->magic, kMagic);
}

ShmTransport::~ShmTransport() {
  if (!unlinked_) shm_unlink(name_.c_str());
  for (auto& m : maps_)
    if (m.base) munmap(m.base, m.bytes);
}

// A peer's segment is mapped only if this process's own user created it with mode 0600:
// another local user who learnt the job's names (the TCP store has no authentication)
// could otherwise hand this rank a segment of its own and inject data or crash it.  The
// checks are on the open descriptor (fstat), so the file cannot be swapped in between.
void ShmTransport::attach(const std::vector<std::string>& names, Clock::time_point deadline) {
  if (int(names.size()) != size_)
    throw std::invalid_argument("attach needs one segment name per rank");
  const std::string me = "pycomm: rank " + std::to_string(rank_) + ": ";
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    const std::string peer = "rank " + std::to_string(r) + "'s shared-memory segment " + names[r];
    int fd;
    while ((fd = shm_open(names[r].c_str(), O_RDWR | O_NOFOLLOW, 0)) < 0) {
      if (errno != ENOENT) throw CommError(me + errnoText("cannot open " + peer));
      if (Clock::now() > deadline)
        throw TimeoutError(me + "timed out waiting for rank " + std::to_string(r) +
                           " to create its shared-memory segment");
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
      close(fd);
      throw CommError(me + errnoText("fstat of " + peer));
    }
    if (!S_ISREG(st.st_mode) || st.st_uid != geteuid() || (st.st_mode & 07777) != 0600) {
      close(fd);
      char mode[8];
      std::snprintf(mode, sizeof(mode), "%04o", unsigned(st.st_mode & 07777));
      throw CommError(me + "refusing " + peer + ": it is owned by uid " + std::to_string(st.st_uid) +
                      " with mode " + mode + ", but pycomm's segments belong to the job's own user (uid " +
                      std::to_string(geteuid()) + ") with mode 0600. Another local user may be "
                      "interfering with this job (see the README's security section); start it again");
    }
    if (size_t(st.st_size) < kHeaderBytes) {
      close(fd);
      if (st.st_size == 0 && Clock::now() < deadline) {  // created, not yet sized
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        --r;
        continue;
      }
      throw CommError(me + peer + " is too small (" + std::to_string(st.st_size) +
                      " bytes) to be a pycomm segment");
    }
    // Read the header first: a segment of another size is a peer with other settings,
    // and mapping past its end would fault.
    void* hp = mmap(nullptr, kHeaderBytes, PROT_READ, MAP_SHARED, fd, 0);
    if (hp == MAP_FAILED) {
      close(fd);
      throw CommError(me + errnoText("mmap of " + peer));
    }
    const Header* h = static_cast<const Header*>(hp);
    while (loadAcquire(&h->magic) != kMagic) {
      if (Clock::now() > deadline) {
        munmap(hp, kHeaderBytes);
        close(fd);
        throw TimeoutError(me + peer + " was never initialised");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    std::string bad;
    if (h->rank != r || h->size != size_)
      bad = "it belongs to rank " + std::to_string(h->rank) + " of " + std::to_string(h->size) +
            ", expected rank " + std::to_string(r) + " of " + std::to_string(size_);
    else if (h->slotBytes != opt_.slotBytes || h->slots != opt_.slots || h->lanes != opt_.lanes)
      bad = "rank " + std::to_string(r) + " runs with PYCOMM_SHM_SLOT_BYTES=" + std::to_string(h->slotBytes) +
            " and PYCOMM_SHM_SLOTS=" + std::to_string(h->slots) + " (" + std::to_string(h->lanes) +
            " lanes) but rank " + std::to_string(rank_) + " with " + std::to_string(opt_.slotBytes) +
            " and " + std::to_string(opt_.slots) + " (" + std::to_string(opt_.lanes) +
            " lanes); every rank must use the same PYCOMM_SHM_* settings";
    else if (h->pid <= 0)
      bad = "its header names pid " + std::to_string(h->pid);
    else if (size_t(st.st_size) != bytes_)
      bad = "it has " + std::to_string(st.st_size) + " bytes where " + std::to_string(bytes_) + " were expected";
    munmap(hp, kHeaderBytes);
    if (!bad.empty()) {
      close(fd);
      throw CommError(me + "cannot use " + peer + ": " + bad);
    }
    void* p = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) throw CommError(me + errnoText("mmap of " + peer));
    maps_[r] = {static_cast<char*>(p), bytes_};
  }
  probePeers();
}

// Reads each peer's magic number out of its own memory, as single-copy receives will read
// its buffers.  The kernel allows it between processes of one user unless Yama's
// ptrace_scope (>= 1: only descendants), a seccomp filter or a container without
// CAP_SYS_PTRACE forbids it, or the peer is in another pid namespace; then this rank
// receives through the slots only, and its peers see canRead == 0 and send it bytes.
void ShmTransport::probePeers() {
  canRead_ = true;
  readWhy_.clear();
  for (int r = 0; r < size_ && canRead_; ++r) {
    if (r == rank_) continue;
    const Header* h = header(r);
    uint64_t magic = 0;
    struct iovec local{&magic, sizeof(magic)};
    struct iovec remote{reinterpret_cast<void*>(h->base), sizeof(magic)};
    ssize_t got = process_vm_readv(pid_t(h->pid), &local, 1, &remote, 1, 0);
    if (got == ssize_t(sizeof(magic)) && magic == kMagic) continue;
    canRead_ = false;
    std::string why = got < 0 ? std::strerror(errno) : "it read back something else";
    if (got < 0 && errno == EPERM) {
      std::ifstream scope("/proc/sys/kernel/yama/ptrace_scope");
      int level = -1;
      if (scope >> level)
        why += " (kernel.yama.ptrace_scope=" + std::to_string(level) + "; 0 allows it)";
      else
        why += " (a container without CAP_SYS_PTRACE, or a seccomp filter, forbids it)";
    } else if (got < 0 && errno == ESRCH) {
      why += " (the peer is in another pid namespace, or gone)";
    } else if (got < 0 && errno == ENOSYS) {
      why += " (the kernel lacks cross-memory attach)";
    }
    readWhy_ = "process_vm_readv of rank " + std::to_string(r) + " (pid " + std::to_string(h->pid) +
               ") failed: " + why;
  }
  if (size_ == 1) readWhy_ = "no peers";
  const bool wanted = singleCopyFrom_ != SIZE_MAX;  // PYCOMM_SHM_SINGLE_COPY=never: neither way
  __atomic_store_n(&header(rank_)->canRead, canRead_ && wanted ? 1u : 0u, __ATOMIC_RELEASE);
}

void ShmTransport::readPeer(int peer, const OpDesc& desc, char* dst, uint64_t remote, size_t n) {
  const Header* h = header(peer);
  while (n > 0) {
    struct iovec local{dst, n};
    struct iovec from{reinterpret_cast<void*>(remote), n};
    ssize_t got = process_vm_readv(pid_t(h->pid), &local, 1, &from, 1, 0);
    if (got > 0) {
      dst += got;
      remote += uint64_t(got);
      n -= size_t(got);
      continue;
    }
    const int e = got < 0 ? errno : EFAULT;
    if (e == EINTR) continue;
    const std::string me = "rank " + std::to_string(rank_);
    const std::string who = "rank " + std::to_string(peer) + " (pid " + std::to_string(h->pid) + ")";
    std::string gone = goneWhy(peer);
    if (e == ESRCH || !gone.empty()) {
      if (gone.empty()) gone = who + " exited";
      fail("pycomm: " + describe(desc) + " on " + me + " failed: " + gone +
               " while this rank was reading its data (single copy)",
           0, Blame{peer, gone + activity(peer)});
    }
    errno = e;
    std::string why = who + "'s memory cannot be read any more: " + errnoText("process_vm_readv");
    fail("pycomm: " + describe(desc) + " on " + me + " failed: " + why +
             "; set PYCOMM_SHM_SINGLE_COPY=never to send every byte through the shared-memory slots",
         0, Blame{peer, why});
  }
}

bool ShmTransport::reapIfStale(const std::string& name) {
  int fd = shm_open(name.c_str(), O_RDONLY | O_NOFOLLOW, 0);
  if (fd < 0) return false;
  struct stat st;
  bool stale = false;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid()) {
    if (size_t(st.st_size) >= kHeaderBytes) {
      void* p = mmap(nullptr, kHeaderBytes, PROT_READ, MAP_SHARED, fd, 0);
      if (p != MAP_FAILED) {
        const Header* h = static_cast<const Header*>(p);
        if (loadAcquire(&h->magic) == kMagic)
          stale = h->pid <= 0 || !processAlive(h->pid, h->startTime);
        else  // its creator died before it finished writing the header
          stale = time(nullptr) - st.st_ctime > 60;
        munmap(p, kHeaderBytes);
      }
    } else {
      stale = time(nullptr) - st.st_ctime > 60;
    }
  }
  close(fd);
  return stale && shm_unlink(name.c_str()) == 0;
}

void ShmTransport::corruptForTest(const std::string& what) {
  Header* h = header(rank_);
  if (what == "pid") {
    h->pid = -1;
  } else if (what == "abort") {
    std::memset(h->abortMsg, 'x', sizeof(h->abortMsg));  // no terminating NUL
    __atomic_store_n(&h->aborted, 1u, __ATOMIC_RELEASE);
  } else if (what == "counter") {
    for (int peer = 0; peer < size_; ++peer)
      for (int lane = 0; lane < opt_.lanes; ++lane)
        if (peer != rank_) storeRelease(&channel(rank_, peer, lane)->head, uint64_t(1) << 40);
  } else {
    throw std::invalid_argument("corruptForTest: 'pid', 'abort' or 'counter', not '" + what + "'");
  }
}

void ShmTransport::unlinkOwn() {
  if (!unlinked_) shm_unlink(name_.c_str());
  unlinked_ = true;
}

ShmTransport::Header* ShmTransport::header(int r) const {
  return reinterpret_cast<Header*>(maps_[r].base);
}

ShmTransport::Channel* ShmTransport::channel(int owner, int dst, int lane) const {
  auto* chans = reinterpret_cast<Channel*>(maps_[owner].base + kHeaderBytes);
  return &chans[size_t(dst) * opt_.lanes + lane];
}

char* ShmTransport::slot(int owner, int dst, int lane, uint64_t index) const {
  size_t nch = size_t(size_) * opt_.lanes;
  size_t per = kPieceHeader + opt_.slotBytes;
  size_t ch = size_t(dst) * opt_.lanes + lane;
  char* slots = maps_[owner].base + kHeaderBytes + nch * sizeof(Channel);
  return slots + (ch * opt_.slots + index % opt_.slots) * per;
}

bool ShmTransport::trySend(int peer, int lane, const OpDesc& desc, const char* data, size_t n) {
  size_t ch = size_t(peer) * opt_.lanes + lane;
  Channel* c = channel(rank_, peer, lane);
  uint64_t head = sendHead_[ch];
  uint64_t tail = loadAcquire(&c->tail);  // written by the peer: check before trusting it
  if (tail > head) corrupted(peer, "its receive counter is ahead of what this rank sent");
  if (head - tail >= uint64_t(opt_.slots)) return false;
  char* s = slot(rank_, peer, lane, head);
  auto* ph = reinterpret_cast<PieceHeader*>(s);
  ph->desc = desc;
  ph->bytes = n;
  ph->remote = 0;
  std::memcpy(s + kPieceHeader, data, n);
  sendHead_[ch] = head + 1;
  storeRelease(&c->head, head + 1);
  return true;
}

bool ShmTransport::tryPost(int peer, int lane, const OpDesc& desc, const char* data, size_t n) {
  size_t ch = size_t(peer) * opt_.lanes + lane;
  Channel* c = channel(rank_, peer, lane);
  uint64_t head = sendHead_[ch];
  uint64_t tail = loadAcquire(&c->tail);
  if (tail > head) corrupted(peer, "its receive counter is ahead of what this rank sent");
  if (head - tail >= uint64_t(opt_.slots)) return false;
  auto* ph = reinterpret_cast<PieceHeader*>(slot(rank_, peer, lane, head));
  ph->desc = desc;
  ph->bytes = n;
  ph->remote = reinterpret_cast<uint64_t>(data);
  sendHead_[ch] = head + 1;
  storeRelease(&c->head, head + 1);
  return true;
}

// Single copy for a collective's own sends of at least singleCopyFrom_ bytes to a peer that
// can read this rank's memory.  Messages (point-to-point, optional tasks) keep the slots:
// their sends complete when posted, and a resumed message task carries no posting state.
bool ShmTransport::singleCopyTask(const Plan& plan, const OpDesc& desc, size_t i) {
  signed char& via = viaPeer_[i];
  if (via < 0) {
    const Task& t = plan.tasks()[i];
    via = !t.optional && t.desc < 0 && Coll(desc.coll) != Coll::SendRecv && t.bytes >= singleCopyFrom_ &&
          __atomic_load_n(&header(t.peer)->canRead, __ATOMIC_ACQUIRE) == 1;
  }
  return via == 1;
}

void ShmTransport::publish(const OpDesc& desc) {
  Header* h = header(rank_);
  uint64_t v = h->pubVersion;
  storeRelease(&h->pubVersion, v + 1);
  __atomic_thread_fence(__ATOMIC_RELEASE);
  h->pub = desc;
  if (Coll(desc.coll) != Coll::SendRecv) h->coll = desc;
  storeRelease(&h->pubVersion, v + 2);
}

namespace {

// The published descriptors of header `h` (seqlock); false while the writer is busy.
template <class H>
bool readPub(const H* h, OpDesc* pub, OpDesc* coll, uint64_t* version) {
  for (int attempt = 0; attempt < 100; ++attempt) {
    uint64_t v0 = loadAcquire(&h->pubVersion);
    OpDesc p = h->pub, c = h->coll;
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (!(v0 & 1) && loadAcquire(&h->pubVersion) == v0) {
      *pub = p;
      *coll = c;
      *version = v0;
      return true;
    }
  }
  return false;
}

}  // namespace

std::string ShmTransport::peerState(int peer) const {
  const Header* h = header(peer);
  OpDesc pub, coll;
  uint64_t v = 0;
  if (!readPub(h, &pub, &coll, &v)) return "is busy";
  if (v == 0) return "has not started any collective of this group";
  if (__atomic_load_n(&h->inOp, __ATOMIC_ACQUIRE)) return "is in " + describe(pub);
  std::string last = coll.seq ? describe(coll) : describe(pub);
  return "is not in any collective of this group (its last, " + last + ", ended " +
         secondsAgo(__atomic_load_n(&h->sinceNs, __ATOMIC_RELAXED)) + " ago)";
}

std::string ShmTransport::activity(int peer) const {
  const Header* h = header(peer);
  OpDesc pub, coll;
  uint64_t v = 0;
  if (!readPub(h, &pub, &coll, &v)) return "";
  if (v == 0) return " before its first collective in this group";
  if (__atomic_load_n(&h->inOp, __ATOMIC_ACQUIRE)) return " in the middle of " + describe(pub);
  return " between collectives (its last, " + describe(coll.seq ? coll : pub) + ", ended " +
         secondsAgo(__atomic_load_n(&h->sinceNs, __ATOMIC_RELAXED)) + " ago)";
}

std::string ShmTransport::goneWhy(int peer) const {
  const Header* h = header(peer);
  const std::string who = "rank " + std::to_string(peer) + " (pid " + std::to_string(h->pid) + ")";
  if (h->pid <= 0) return "";  // corrupted: checkPeers says so
  if (!processAlive(h->pid, h->startTime)) return who + " exited";
  if (__atomic_load_n(&h->left, __ATOMIC_ACQUIRE))
    return "rank " + std::to_string(peer) + " left the group (" + peerText(h->leftWhy, sizeof(h->leftWhy)) + ")";
  char state = processState(h->pid);
  if (state == 'T' || state == 't')
    return who + " is stopped (process state " + std::string(1, state) +
           ": SIGSTOP, Ctrl-Z or a debugger; SIGCONT resumes it)";
  return "";
}

std::vector<std::pair<int, std::string>> ShmTransport::gone() const {
  std::vector<std::pair<int, std::string>> out;
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    std::string why = goneWhy(r);
    if (!why.empty()) out.emplace_back(r, why);
  }
  return out;
}

// From the rank this one waits for, follow each rank's published waitingOn until a rank
// that is not waiting on another: that one is late.  It is gone (exited, left, stopped),
// failed (then its own finding is passed on), outside any collective of this group
// (computing, or in another group), or in the collective but waiting for nobody (busy, or
// descheduled).  A healthy rank blocked on the late one is only a link of the chain.
ShmTransport::Blame ShmTransport::follow(int first) const {
  Blame b;
  std::vector<char> seen(size_, 0);
  seen[rank_] = 1;
  int r = first;
  for (;;) {
    b.path.push_back(r);
    seen[r] = 1;
    const Header* h = header(r);
    const std::string name = "rank " + std::to_string(r);
    std::string why = goneWhy(r);
    if (!why.empty()) {
      b.rank = r;
      b.why = why + activity(r);
      if (!__atomic_load_n(&h->left, __ATOMIC_ACQUIRE))  // stopped or dead: since when
        b.why += ", no sign of life for " + secondsAgo(__atomic_load_n(&h->beatNs, __ATOMIC_RELAXED));
      return b;
    }
    if (__atomic_load_n(&h->aborted, __ATOMIC_ACQUIRE)) {
      int blame = __atomic_load_n(&h->blame, __ATOMIC_RELAXED);
      if (blame >= 0 && blame < size_ && blame != r) {
        b.rank = blame;
        b.why = peerText(h->blameWhy, sizeof(h->blameWhy));
        b.by = r;
        b.relayed = true;
      } else {
        b.rank = r;
        b.why = name + " gave up: " + peerText(h->abortMsg, sizeof(h->abortMsg));
      }
      return b;
    }
    if (!__atomic_load_n(&h->inOp, __ATOMIC_ACQUIRE)) {
      b.rank = r;
      b.why = name + " " + peerState(r) + ": it is computing, or waiting in another group";
      return b;
    }
    int w = __atomic_load_n(&h->waitingOn, __ATOMIC_RELAXED);
    if (w < 0 || w >= size_ || w == r) {
      b.rank = r;
      b.why = name + " " + peerState(r) + " and waits for no one: it is busy (copying or reducing) "
              "or not given a core, last sign of life " +
              secondsAgo(__atomic_load_n(&h->beatNs, __ATOMIC_RELAXED)) + " ago";
      return b;
    }
    if (seen[w]) {  // waits that close a circle: nobody in it is late, the plans disagree
      b.rank = -1;
      b.why = name + " " + peerState(r) + " and waits for rank " + std::to_string(w) +
              " in turn: these ranks wait for each other";
      return b;
    }
    r = w;
  }
}

void ShmTransport::setWaiting(int peer) {
  waiting_ = peer;
  Header* h = header(rank_);
  __atomic_store_n(&h->waitingOn, int32_t(peer), __ATOMIC_RELAXED);
  __atomic_store_n(&h->beatNs, nowNs(), __ATOMIC_RELAXED);
}

void ShmTransport::abort(const std::string& why) {
  Header* h = header(rank_);
  if (__atomic_load_n(&h->aborted, __ATOMIC_ACQUIRE)) return;
  size_t n = std::min(why.size(), sizeof(h->abortMsg) - 1);
  std::memcpy(h->abortMsg, why.data(), n);
  h->abortMsg[n] = 0;
  __atomic_store_n(&h->aborted, 1u, __ATOMIC_RELEASE);
}

void ShmTransport::leave(const std::string& reason) {
  Header* h = header(rank_);
  if (__atomic_load_n(&h->left, __ATOMIC_ACQUIRE)) return;
  size_t n = std::min(reason.size(), sizeof(h->leftWhy) - 1);
  std::memcpy(h->leftWhy, reason.data(), n);
  h->leftWhy[n] = 0;
  __atomic_store_n(&h->left, 1u, __ATOMIC_RELEASE);
}

// kind: 0 CommError, 1 TimeoutError, 2 MismatchError.  Every failure is also announced to
// the peers (abort), with the rank at fault, and makes this communicator unusable: its
// channels may hold pieces of a collective that will never finish.
void ShmTransport::fail(const std::string& msg, int kind, const Blame& blame) {
  failure_ = msg;
  Header* h = header(rank_);
  if (!__atomic_load_n(&h->aborted, __ATOMIC_ACQUIRE)) {
    size_t n = std::min(blame.why.size(), sizeof(h->blameWhy) - 1);
    std::memcpy(h->blameWhy, blame.why.data(), n);
    h->blameWhy[n] = 0;
    h->blameBy = blame.by >= 0 ? blame.by : rank_;
    h->blame = blame.rank;
  }
  abort(msg);
  if (kind == 1) throw TimeoutError(msg);
  if (kind == 2) throw MismatchError(msg);
  throw CommError(msg);
}

void ShmTransport::fail(const std::string& msg, int kind) { fail(msg, kind, Blame()); }

// Everything read from a peer's memory is checked before use; memory that breaks the
// protocol (a bug, or a process of this user writing into it) fails the collective with an
// error naming the peer, never an access out of bounds.
void ShmTransport::corrupted(int peer, const std::string& what) {
  fail("pycomm: rank " + std::to_string(rank_) + " found rank " + std::to_string(peer) +
           "'s shared memory corrupted: " + what + ". The group cannot go on; start a new one",
       0, Blame{peer, "rank " + std::to_string(peer) + "'s shared memory is corrupted: " + what});
}

std::vector<char> ShmTransport::neededPeers(const std::vector<Task>& tasks) const {
  std::vector<char> need(size_, 0);
  for (const Task& t : tasks) {
    if (t.optional || t.done == t.bytes || need[t.peer]) continue;
    if (t.kind == Task::Send) {
      need[t.peer] = 1;  // it must still take these bytes
    } else {
      // A peer that finished its part has put all it sends us into its slots already.
      const Channel* c = channel(t.peer, rank_, t.lane);
      need[t.peer] = loadAcquire(&c->head) == recvTail_[size_t(t.peer) * opt_.lanes + t.lane];
    }
  }
  return need;
}

// What the communicator asks between progress slices: it waits on `waitingOn` (a message
// from or to that peer), or on anyone (-1: a receive from any source).
void ShmTransport::checkPeers(const OpDesc& desc, int waitingOn) {
  std::vector<char> needed(size_, waitingOn < 0 ? 1 : 0);
  if (waitingOn >= 0 && waitingOn < size_) needed[waitingOn] = 1;
  needed[rank_] = 0;
  checkPeers(desc, needed);
}

void ShmTransport::checkPeers(const OpDesc& desc, const std::vector<char>& needed) {
  const std::string me = "rank " + std::to_string(rank_);
  Header* mine = header(rank_);
  // Another thread of this process gave up on the group (torch's abort, shut-down).
  if (__atomic_load_n(&mine->left, __ATOMIC_ACQUIRE))
    fail("pycomm: " + describe(desc) + " on " + me + " stopped: this rank left the group (" +
             peerText(mine->leftWhy, sizeof(mine->leftWhy)) + ") while it ran",
         0);
  if (__atomic_load_n(&mine->aborted, __ATOMIC_ACQUIRE)) {
    failure_ = "pycomm: " + describe(desc) + " on " + me + " was aborted: " +
               peerText(mine->abortMsg, sizeof(mine->abortMsg));
    throw CommError(failure_);
  }
  for (int r = 0; r < size_; ++r) {
    if (r == rank_) continue;
    Header* h = header(r);
    if (h->pid <= 0) corrupted(r, "its header names pid " + std::to_string(h->pid));
    const std::string peer = "rank " + std::to_string(r);
    // A peer this rank no longer needs may have finished its part and gone: that is a
    // normal shut-down, not a failure.
    if (needed[r] && __atomic_load_n(&h->aborted, __ATOMIC_ACQUIRE)) {
      int blame = __atomic_load_n(&h->blame, __ATOMIC_RELAXED);
      int by = __atomic_load_n(&h->blameBy, __ATOMIC_RELAXED);
      if (blame < -1 || blame >= size_ || by < -1 || by >= size_)
        corrupted(r, "it blames rank " + std::to_string(blame) + " (found by rank " + std::to_string(by) + ")");
      const std::string msg = peerText(h->abortMsg, sizeof(h->abortMsg));
      if (blame >= 0 && blame != rank_) {
        Blame b{blame, peerText(h->blameWhy, sizeof(h->blameWhy)), {}, by};
        fail("pycomm: " + describe(desc) + " on " + me + " failed: " + b.why + " (found by rank " +
                 std::to_string(by) + ", which gave up and told the group)",
             0, b);
      }
      fail("pycomm: " + describe(desc) + " on " + me + " stopped because " + peer + " failed: " + msg, 0,
           Blame{blame, blame >= 0 ? peerText(h->blameWhy, sizeof(h->blameWhy)) : "", {}, by});
    }
    if (needed[r] && !processAlive(h->pid, h->startTime)) {
      std::string why = peer + " (pid " + std::to_string(h->pid) + ") exited";
      fail("pycomm: " + describe(desc) + " on " + me + " failed: " + why + " while this rank was waiting for it",
           0, Blame{r, why + activity(r)});
    }
    if (needed[r] && __atomic_load_n(&h->left, __ATOMIC_ACQUIRE)) {
      std::string why = peer + " left the group (" + peerText(h->leftWhy, sizeof(h->leftWhy)) + ")";
      fail("pycomm: " + why + " while " + me + " waited in " + describe(desc) + " for it; it " + peerState(r) +
               ". Destroy the group on every rank, or call pycomm.shrink() to go on without it",
           0, Blame{r, why + activity(r)});
    }
    // A peer that published a different collective under the same sequence number has
    // been called with other arguments: report it instead of waiting for bytes it will
    // never send.
    if (Coll(desc.coll) != Coll::SendRecv) {
      OpDesc d, c;
      uint64_t v0 = 0;
      if (readPub(h, &d, &c, &v0) && v0 && Coll(d.coll) != Coll::SendRecv && d.seq == desc.seq && !sameOp(d, desc)) {
        fail("pycomm: mismatched collectives: " + me + " called " + describe(desc) + " but " + peer +
                 " called " + describe(d) +
                 "; every rank must call the same collectives in the same order with the same "
                 "sizes, dtypes, ops and algorithm",
             2);
      }
    }
  }
}

// Waits without burning a core another rank needs: spin briefly (a peer on another core
// answers in well under a microsecond), then yield, then sleep.  With more ranks than
// cores the yielding is what lets the rank we wait for run at all.
class ShmTransport::Progress {
 public:
  // Peers are first checked 5 ms into a wait: the check reads /proc (tens of
  // microseconds), which a peer arriving a few microseconds late must not pay for.
  // `since`: when the wait began (a resumed wait started earlier than this call).
  Progress(ShmTransport& t, const OpDesc& desc, const std::vector<Task>& tasks, Clock::time_point deadline,
           Clock::time_point since)
      : t_(t), desc_(desc), tasks_(tasks), deadline_(deadline),
        start_(since == Clock::time_point() ? Clock::now() : since),
        nextCheck_(start_ + std::chrono::milliseconds(5)) {}
  void progressed() {
    idle_ = 0;
    if (t_.waiting_ >= 0) t_.setWaiting(-1);
  }
  void idle(int waitingOn) {
    ++idle_;
    if (idle_ < 512) {
      cpuRelax();
      return;
    }
    // Past the spin, peers that time out on this rank can see whom it waits for.
    if (waitingOn != t_.waiting_) t_.setWaiting(waitingOn);
    auto now = Clock::now();
    if (now >= nextCheck_) {
      std::vector<char> needed = t_.neededPeers(tasks_);
      for (size_t r = 0; r < extra_.size(); ++r) needed[r] = needed[r] || extra_[r];
      t_.checkPeers(desc_, needed);
      __atomic_store_n(&t_.header(t_.rank_)->beatNs, nowNs(), __ATOMIC_RELAXED);
      nextCheck_ = now + std::chrono::milliseconds(5);
    }
    if (now >= deadline_) timeout(now, waitingOn);
    if (idle_ < 4096) {
      sched_yield();
    } else {
      // Sleep longer the longer nothing happens, up to 200 us: a late peer costs little
      // latency and an idle rank costs almost no CPU.
      auto us = std::min<long>(200, 5 + (idle_ - 4096) / 16);
      std::this_thread::sleep_for(std::chrono::microseconds(us));
    }
  }

 private:
  // Names the rank that is actually late, not just the one this rank waits for: that one
  // may itself be blocked on the culprit (NCCL's desync report, torch's flight recorder).
  [[noreturn]] void timeout(Clock::time_point now, int waitingOn) {
    double s = std::chrono::duration<double>(now - start_).count();
    std::ostringstream os;
    os.precision(3);
    os << "pycomm: " << describe(desc_) << " timed out after " << s << " s on rank " << t_.rank_
       << " of " << t_.size_;
    Blame b;
    if (waitingOn >= 0) {
      b = t_.follow(waitingOn);
      os << ": waiting for rank " << waitingOn;
      for (size_t i = 1; i < b.path.size(); ++i) os << ", which waits for rank " << b.path[i];
      os << (b.relayed ? ", which gave up because " : ": ") << b.why;
    }
    t_.fail(os.str(), 1, b);
  }

  ShmTransport& t_;
  const OpDesc& desc_;
  const std::vector<Task>& tasks_;
  Clock::time_point deadline_, start_, nextCheck_;
  long idle_ = 0;

 public:
  std::vector<char> extra_;  // peers needed beyond the tasks' (confirmArrival)
};

namespace {

// How many bytes of `t` its dependencies allow it to handle now (see plan.h).
size_t allowedBytes(const std::vector<Task>& tasks, const Task& t) {
  size_t allowed = t.bytes;
  for (int i = 0; i < t.ndeps; ++i) {
    const Task& d = tasks[t.deps[i]];
    size_t a = d.bytes == t.bytes ? d.done : (d.done == d.bytes ? t.bytes : 0);
    allowed = std::min(allowed, a);
  }
  return allowed;
}

}  // namespace

// Marks this rank in or out of the collective in its header around the work (peers that
// time out read it), and makes sure no exception leaves a collective without telling the
// peers: an internal error mid-way leaves the channels half used, like any failure.
bool ShmTransport::execute(Plan& plan, const OpDesc& desc, DType reduceType, RedOp op,
                           Clock::time_point deadline, Clock::time_point returnBy,
                           Clock::time_point since, const std::atomic<bool>* interrupt) {
  Header* h = header(rank_);
  auto mark = [&](uint32_t in) {
    uint64_t now = nowNs();
    __atomic_store_n(&h->sinceNs, now, __ATOMIC_RELAXED);
    __atomic_store_n(&h->beatNs, now, __ATOMIC_RELAXED);
    __atomic_store_n(&h->inOp, in, __ATOMIC_RELEASE);
    if (waiting_ >= 0) setWaiting(-1);
  };
  mark(1);
  try {
    bool finished = run(plan, desc, reduceType, op, deadline, returnBy, since, interrupt);
    mark(0);
    return finished;
  } catch (const CommError&) {
    mark(0);
    throw;
  } catch (const std::exception& e) {
    mark(0);
    if (failure_.empty()) {
      failure_ = "pycomm: " + describe(desc) + " on rank " + std::to_string(rank_) + " failed: " + e.what();
      abort(failure_);
    }
    throw;
  }
}

void ShmTransport::usable() const {
  if (!failure_.empty())
    throw CommError("pycomm: this communicator failed earlier and cannot be used again "
                    "(destroy it and create a new one): " + failure_);
}

bool ShmTransport::peek(int peer, int lane, OpDesc* desc) {
  usable();
  if (peer < 0 || peer >= size_ || peer == rank_ || lane < 0 || lane >= opt_.lanes)
    throw std::logic_error("peek at peer " + std::to_string(peer) + " lane " + std::to_string(lane));
  const uint64_t tail = recvTail_[size_t(peer) * opt_.lanes + lane];
  const uint64_t head = loadAcquire(&channel(peer, rank_, lane)->head);
  if (head == tail) return false;
  if (head - tail > uint64_t(opt_.slots))
    corrupted(peer, "its send counter is " + std::to_string(head - tail) + " pieces ahead, with " +
                        std::to_string(opt_.slots) + " slots");
  *desc = reinterpret_cast<const PieceHeader*>(slot(peer, rank_, lane, tail))->desc;
  return true;
}

bool ShmTransport::run(Plan& plan, const OpDesc& desc, DType reduceType, RedOp op,
                       Clock::time_point deadline, Clock::time_point returnBy, Clock::time_point since,
                       const std::atomic<bool>* interrupt) {
  usable();
  auto& tasks = plan.tasks();
  const size_t nch = size_t(size_) * opt_.lanes;
  auto &sendQ = sendQ_, &recvQ = recvQ_;
  sendQ.resize(nch);
  recvQ.resize(nch);
  for (size_t q = 0; q < nch; ++q) sendQ[q].clear(), recvQ[q].clear();
  for (size_t i = 0; i < tasks.size(); ++i) {
    const Task& t = tasks[i];
    if (t.peer < 0 || t.peer >= size_ || t.peer == rank_ || t.lane < 0 || t.lane >= opt_.lanes)
      throw std::logic_error("plan names peer " + std::to_string(t.peer) + " lane " +
                             std::to_string(t.lane));
    (t.kind == Task::Send ? sendQ : recvQ)[size_t(t.peer) * opt_.lanes + t.lane].push_back(int(i));
  }
  auto &sHead = sHead_, &rHead = rHead_;
  sHead.assign(nch, 0);
  rHead.assign(nch, 0);
  size_t remaining = 0;  // required tasks not yet done
  for (const Task& t : tasks) remaining += t.optional ? 0 : 1;
  const size_t esize = dtypeSize(reduceType);
  Progress progress(*this, desc, tasks, deadline, since);
  if (planOf_ != &plan || planSeq_ != desc.seq) {  // a new plan, not one resumed
    planOf_ = &plan;
    planSeq_ = desc.seq;
    posted_.assign(tasks.size(), 0);
    viaPeer_.assign(tasks.size(), -1);
  }
  posted_.resize(tasks.size(), 0);
  viaPeer_.resize(tasks.size(), -1);

  while (remaining) {
    bool moved = false, woken = false;
    int waitingOn = -1;
    for (size_t q = 0; q < nch; ++q) {
      const int peer = int(q / opt_.lanes), lane = int(q % opt_.lanes);
      if (!inflight_[q].empty()) {
        // Single-copy pieces the receiver has taken: their bytes may be reused now.
        const uint64_t taken = loadAcquire(&channel(rank_, peer, lane)->tail);
        if (taken > sendHead_[q]) corrupted(peer, "its receive counter is ahead of what this rank sent");
        while (!inflight_[q].empty() && inflight_[q].front().piece < taken) {
          const InFlight f = inflight_[q].front();
          inflight_[q].pop_front();
          Task& t = tasks[size_t(f.task)];
          t.done += f.bytes;
          if (t.done == t.bytes) {
            if (!t.optional) --remaining;
            woken |= t.wake;
          }
          moved = true;
        }
        if (!inflight_[q].empty() && waitingOn < 0) waitingOn = peer;
      }
      while (sHead[q] < sendQ[q].size()) {
        const int ti = sendQ[q][sHead[q]];
        Task& t = tasks[ti];
        if (singleCopyTask(plan, desc, size_t(ti))) {  // done once taken (above), not once posted
          size_t& posted = posted_[size_t(ti)];
          if (posted == t.bytes) {
            ++sHead[q];
            continue;
          }
          size_t allowed = allowedBytes(tasks, t);
          if (allowed <= posted) break;
          size_t n = std::min(opt_.slotBytes, allowed - posted);
          if (!tryPost(peer, lane, desc, t.src + posted, n)) {
            if (waitingOn < 0) waitingOn = peer;
            break;
          }
          inflight_[q].push_back({sendHead_[q] - 1, ti, n});
          posted += n;
          singleCopySent_ += n;
          moved = true;
          continue;
        }
        if (t.done == t.bytes) {
          ++sHead[q];
          if (!t.optional) --remaining;
          woken |= t.wake;
          moved = true;
          continue;
        }
        size_t allowed = allowedBytes(tasks, t);
        if (allowed <= t.done) break;
        size_t n = std::min(opt_.slotBytes, allowed - t.done);
        if (!trySend(peer, lane, plan.descOf(t, desc), t.src + t.done, n)) {
          if (waitingOn < 0 && !t.optional) waitingOn = peer;
          break;
        }
        t.done += n;
        moved = true;
      }
      while (rHead[q] < recvQ[q].size()) {
        Task& t = tasks[recvQ[q][rHead[q]]];
        if (t.done == t.bytes) {
          ++rHead[q];
          if (!t.optional) --remaining;
          woken |= t.wake;
          moved = true;
          continue;
        }
        Channel* c = channel(peer, rank_, lane);
        uint64_t tail = recvTail_[q];
        const uint64_t head = loadAcquire(&c->head);
        if (head == tail) {
          if (!t.optional) waitingOn = peer;  // messages riding along wait for no one
          break;
        }
        if (head - tail > uint64_t(opt_.slots))
          corrupted(peer, "its send counter is " + std::to_string(head - tail) + " pieces ahead, with " +
                              std::to_string(opt_.slots) + " slots");
        if (t.kind == Task::Probe) {  // a piece is there: the caller matches it
          t.done = t.bytes;
          continue;
        }
        const char* s = slot(peer, rank_, lane, tail);
        const auto* ph = reinterpret_cast<const PieceHeader*>(s);
        const OpDesc& want = plan.descOf(t, desc);
        if (!sameOp(ph->desc, want))
          fail("pycomm: mismatched collectives: rank " + std::to_string(rank_) + " called " +
                   describe(want) + " but rank " + std::to_string(peer) + " called " +
                   describe(ph->desc) +
                   "; every rank must call the same collectives in the same order with the "
                   "same sizes, dtypes, ops and algorithm",
               2);
        size_t n = ph->bytes;
        if (n > opt_.slotBytes)
          corrupted(peer, "a piece claims " + std::to_string(n) + " bytes, more than a slot holds");
        if (n == 0 || n > t.bytes - t.done)
          fail("pycomm: " + describe(desc) + ": rank " + std::to_string(peer) + " sent " +
                   std::to_string(n) + " bytes where rank " + std::to_string(rank_) + " expected at most " +
                   std::to_string(t.bytes - t.done),
               2);
        if (t.done + n > allowedBytes(tasks, t)) break;
        if (ph->remote != 0) {  // single copy: the bytes are in the sender's own memory
          if (t.kind == Task::RecvCopy) {
            readPeer(peer, want, t.dst + t.done, ph->remote, n);
          } else {
            if (bounce_.size() < opt_.slotBytes) bounce_.resize(opt_.slotBytes);
            readPeer(peer, want, bounce_.data(), ph->remote, n);
            if (t.receivedFirst)  // the same operand order as the slot path: same bits on every rank
              reducer_->reduce(t.dst + t.done, bounce_.data(), t.src + t.done, n / esize, reduceType, op);
            else
              reducer_->reduce(t.dst + t.done, t.src + t.done, bounce_.data(), n / esize, reduceType, op);
          }
        } else if (t.kind == Task::RecvCopy) {
          std::memcpy(t.dst + t.done, s + kPieceHeader, n);
        } else if (t.receivedFirst) {
          reducer_->reduce(t.dst + t.done, s + kPieceHeader, t.src + t.done, n / esize, reduceType, op);
        } else {
          reducer_->reduce(t.dst + t.done, t.src + t.done, s + kPieceHeader, n / esize, reduceType, op);
        }
        recvTail_[q] = tail + 1;
        storeRelease(&c->tail, tail + 1);
        t.done += n;
        moved = true;
      }
    }
    if (woken && remaining) return false;
    if (moved) {
      progress.progressed();
    } else if (remaining) {
      if (returnBy != Clock::time_point::max() && Clock::now() >= returnBy) return false;
      if (interrupt && interrupt->load(std::memory_order_acquire)) return false;
      progress.idle(waitingOn);
    }
  }
  planOf_ = nullptr;  // finished: a later plan at the same address starts afresh
  if (Coll(desc.coll) != Coll::SendRecv) {
    // A one-hop collective (the exchange all-reduce) can finish without ever waiting, so
    // without this a rank arriving after its peer gave up would return while the peer
    // failed: both ranks must agree that this collective failed.
    for (int r = 0; r < size_; ++r)
      if (r != rank_ && __atomic_load_n(&header(r)->aborted, __ATOMIC_ACQUIRE)) checkPeers(desc, r);
    confirmArrival(desc, tasks, progress);
  }
  return true;
}

// A rank whose part only sends (a broadcast's root, a gather's leaf) or moves nothing (an
// empty collective) would return before any peer could tell it that it called something
// else (another root, another size): the peers' checks of the pieces they receive cannot
// reach it.  So it waits until each peer it only sent to (every peer, for an empty part)
// has published this collective or a later one, and compares: a mismatch is an error on
// every rank, never one rank returning while the other fails or waits.
void ShmTransport::confirmArrival(const OpDesc& desc, const std::vector<Task>& tasks, Progress& progress) {
  // Most collectives receive from every peer they send to (an all-reduce): nothing to
  // confirm, and nothing to allocate on the latency-bound path.
  bool onlySent = false, anyTask = false;
  for (size_t i = 0; i < tasks.size() && !onlySent; ++i) {
    const Task& t = tasks[i];
    if (t.optional) continue;
    anyTask = true;
    if (t.kind != Task::Send) continue;
    onlySent = true;
    for (const Task& u : tasks)
      if (!u.optional && u.kind != Task::Send && u.peer == t.peer) {
        onlySent = false;
        break;
      }
  }
  if (anyTask && !onlySent) return;
  std::vector<char> sends(size_, 0), receives(size_, 0);
  bool any = false;
  for (const Task& t : tasks) {
    if (t.optional) continue;
    any = true;
    (t.kind == Task::Send ? sends : receives)[t.peer] = 1;
  }
  std::vector<char> wait(size_, 0);
  for (int r = 0; r < size_; ++r) wait[r] = r != rank_ && (any ? sends[r] && !receives[r] : 1);
  progress.extra_ = wait;
  for (;;) {
    int pending = -1;
    for (int r = 0; r < size_; ++r) {
      if (!wait[r]) continue;
      OpDesc pub, coll;
      uint64_t v = 0;
      if (readPub(header(r), &pub, &coll, &v) && v && coll.seq >= desc.seq) {
        if (coll.seq == desc.seq && !sameOp(coll, desc))
          fail("pycomm: mismatched collectives: rank " + std::to_string(rank_) + " called " + describe(desc) +
                   " but rank " + std::to_string(r) + " called " + describe(coll) +
                   "; every rank must call the same collectives in the same order with the same "
                   "sizes, dtypes, ops, roots and algorithm",
               2);
        wait[r] = 0;
      } else if (pending < 0) {
        pending = r;
      }
    }
    if (pending < 0) return;
    progress.idle(pending);
  }
}

}  // namespace pycomm
