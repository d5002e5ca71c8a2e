#include "worker.h"

#include <sched.h>

#include <chrono>
#include <stdexcept>

#include "common.h"

namespace pycomm {

namespace {

using std::chrono::steady_clock;

// How long a thread spins before it blocks.  Short: on a machine with as many ranks as
// cores (the 2-core CI machine), a worker or a waiter that spins takes the core its own
// rank's other thread, or a peer, needs; measured there, 50 us of spinning made a small
// torch.distributed all_reduce 4x slower (147 against 33 us) than blocking at once.
constexpr auto kSpin = std::chrono::microseconds(5);

}  // namespace

bool Completion::wait(double timeoutS) {
  auto start = steady_clock::now();
  for (int i = 0; !done(); ++i) {
    if (steady_clock::now() - start > kSpin) break;
    if (i % 64 == 63) sched_yield(); else cpuRelax();
  }
  if (done()) return true;
  std::unique_lock<std::mutex> lock(mu_);
  if (timeoutS < 0) {
    cv_.wait(lock, [this] { return done(); });
    return true;
  }
  return cv_.wait_for(lock, std::chrono::duration<double>(timeoutS), [this] { return done(); });
}

void Completion::onDone(std::function<void()> cb) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!done()) {
      callbacks_.push_back(std::move(cb));
      return;
    }
  }
  cb();
}

void Completion::finish(Kind kind, std::string message) {
  std::vector<std::function<void()>> callbacks;
  {
    std::lock_guard<std::mutex> lock(mu_);
    kind_ = kind;
    message_ = std::move(message);
    done_.store(true, std::memory_order_release);
    callbacks.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& cb : callbacks) cb();
}

Worker::Worker(std::string name) : name_(std::move(name)), thread_([this] { loop(); }) {}

Worker::~Worker() { close(); }

void Worker::close() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

std::shared_ptr<Completion> Worker::submit(std::function<void()> job) {
  auto done = std::make_shared<Completion>();
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) throw std::runtime_error("pycomm: this group was destroyed; call init_process_group again");
    queue_.push_back(Job{std::move(job), done});
    pending_.fetch_add(1, std::memory_order_acq_rel);
  }
  if (sleeping_.load(std::memory_order_acquire)) cv_.notify_one();
  return done;
}

void Worker::drain() {
  auto start = steady_clock::now();
  for (int i = 0; !idle(); ++i) {
    if (steady_clock::now() - start < kSpin) {
      cpuRelax();
      continue;
    }
    std::this_thread::sleep_for(std::chrono::microseconds(20));
  }
}

void Worker::loop() {
  for (;;) {
    Job job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (queue_.empty()) {
        // Spin a little (without the lock) for the next job before sleeping.
        lock.unlock();
        auto start = steady_clock::now();
        while (steady_clock::now() - start < kSpin && pending_.load(std::memory_order_acquire) == 0)
          cpuRelax();
        lock.lock();
        sleeping_.store(true, std::memory_order_release);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        sleeping_.store(false, std::memory_order_release);
        if (queue_.empty()) return;  // stopping, nothing left
      }
      job = std::move(queue_.front());
      queue_.pop_front();
    }
    Completion::Kind kind = Completion::None;
    std::string message;
    try {
      job.fn();
    } catch (const TimeoutError& e) {
      kind = Completion::Timeout, message = e.what();
    } catch (const MismatchError& e) {
      kind = Completion::Mismatch, message = e.what();
    } catch (const CommError& e) {
      kind = Completion::Comm, message = e.what();
    } catch (const std::exception& e) {
      kind = Completion::Other, message = e.what();
    } catch (...) {
      kind = Completion::Other, message = "unknown error";
    }
    job.fn = nullptr;  // release what the job captured before anyone is told it is done
    job.done->finish(kind, std::move(message));
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

}  // namespace pycomm
