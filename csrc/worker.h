// The in-order worker of a group: asynchronous operations run on it, one after another, in
// the order they were submitted.
//
// Why a C++ thread and not a Python one: handing a job to a Python thread and back costs two
// GIL hand-offs (about 20 us each on a small VM), more than a small collective.  A job here
// is a std::function; one that only calls the communicator runs without the GIL, so an
// asynchronous all-reduce from torch.distributed (DDP's buckets) never touches Python.
// The worker and a waiter spin for a few microseconds before they block, no longer:
// spinning threads steal the cores the ranks need (worker.cpp, kSpin).
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pycomm {

// The outcome of one job: set once, by the worker.
class Completion {
 public:
  enum Kind { None = 0, Comm = 1, Timeout = 2, Mismatch = 3, Other = 4 };

  bool done() const { return done_.load(std::memory_order_acquire); }
  // Blocks until done (spins first); false if `timeoutS` (>= 0) passed first.
  bool wait(double timeoutS = -1);
  Kind kind() const { return kind_; }           // valid once done()
  const std::string& message() const { return message_; }
  // cb() once done: at once (on this thread) if it is, else on the worker after the job.
  void onDone(std::function<void()> cb);

  void finish(Kind kind, std::string message);  // the worker's side

 private:
  std::atomic<bool> done_{false};
  Kind kind_ = None;
  std::string message_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::function<void()>> callbacks_;
};

class Worker {
 public:
  explicit Worker(std::string name);
  ~Worker();  // close()
  // Runs what is queued, then stops the thread; idempotent.  Python calls it without the
  // GIL, since queued Python jobs need the GIL to finish.
  void close();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  // Queues `job`; its exception (CommError & co., or any other) becomes the Completion's.
  std::shared_ptr<Completion> submit(std::function<void()> job);
  // Blocks until every job submitted so far has finished.
  void drain();
  bool idle() const { return pending_.load(std::memory_order_acquire) == 0; }

 private:
  void loop();

  struct Job {
    std::function<void()> fn;
    std::shared_ptr<Completion> done;
  };
  std::string name_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::atomic<long> pending_{0};  // submitted, not finished
  std::atomic<bool> sleeping_{false};
  bool stop_ = false;
  std::thread thread_;
};

}  // namespace pycomm
