// Elementwise reduction kernels: dst[i] = a[i] op b[i].  `a` may alias `dst`.
// Half types are reduced by the Python layer in float32 (upcast once, round once), so the
// kernels cover the types that are reduced natively: sum, prod, min, max (and avg, as a
// sum) for every other type, and band, bor, bxor for integers and bool.
#pragma once

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include "common.h"

namespace pycomm {

// Throws std::invalid_argument for a (dtype, op) pair without a kernel.
void reduceInto(void* dst, const void* a, const void* b, size_t count, DType dtype, RedOp op);
bool canReduce(DType dtype);

// reduceInto split across `threads` threads: the caller's and threads - 1 helpers, for a
// rank with idle cores (the Python layer decides how many: PYCOMM_SHM_REDUCE_THREADS).
// Elementwise, so the result is the same bits whatever the split.  Helpers spin briefly
// after each piece (the next one is usually microseconds away), then sleep.  One caller at
// a time: a transport reduces from its progress thread only.
class ReducePool {
 public:
  explicit ReducePool(int threads = 1);
  ~ReducePool();
  ReducePool(const ReducePool&) = delete;
  ReducePool& operator=(const ReducePool&) = delete;

  int threads() const { return int(helpers_.size()) + 1; }
  // Splits only reductions of at least kSplitFrom bytes per thread; smaller ones cost more
  // to hand out than to do.
  static constexpr size_t kSplitFrom = 32 * 1024;
  void reduce(void* dst, const void* a, const void* b, size_t count, DType dtype, RedOp op);

 private:
  struct Job {
    char* dst = nullptr;
    const char* a = nullptr;
    const char* b = nullptr;
    size_t count = 0, per = 0, esize = 0;
    DType dtype{};
    RedOp op{};
  };
  void part(int index);
  void helper(int index);

  std::vector<std::thread> helpers_;
  Job job_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::mutex mutex_;
  std::condition_variable wake_;
  int sleepers_ = 0;
  std::atomic<bool> stop_{false};
};

}  // namespace pycomm
