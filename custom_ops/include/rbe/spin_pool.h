// Worker threads started once and kept between calls, spinning a short while for the next call before they
// sleep (as ORT's intra-op pool does), so that kernels timed outside ORT (the Python binding, rbe_gemv_bench)
// measure the kernels, not thread start-up or wake-up latency. The calling thread works too. Not part of the
// op library: inside ORT the kernels run on ORT's own pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "rbe/kernels.h"

namespace rbe {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

class SpinPool {
 public:
  static SpinPool& instance() {
    static SpinPool pool;
    return pool;
  }

  void run(int threads, size_t n, const std::function<void(size_t)>& task) {
    std::lock_guard<std::mutex> one_call(call_mu_);
    const size_t helpers = std::min<size_t>(static_cast<size_t>(std::max(threads, 1) - 1), n > 0 ? n - 1 : 0);
    while (workers_.size() < helpers) {
      const size_t id = workers_.size();
      workers_.emplace_back([this, id] { loop(id); });
    }
    task_ = &task;
    n_ = n;
    next_ = 0;
    error_ = nullptr;
    busy_ = helpers;
    {
      std::lock_guard<std::mutex> lk(mu_);
      helpers_ = helpers;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    work();
    while (busy_.load(std::memory_order_acquire) != 0) cpu_relax();
    if (error_) std::rethrow_exception(error_);
  }

  ~SpinPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      generation_.fetch_add(1, std::memory_order_release);
    }
    wake_.notify_all();
    for (auto& t : workers_) t.join();
  }

 private:
  void work() {
    try {
      for (size_t i; (i = next_.fetch_add(1)) < n_;) (*task_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lk(mu_);
      if (!error_) error_ = std::current_exception();
      next_ = n_;
    }
  }

  void loop(size_t id) {
    uint64_t seen = 0;
    for (;;) {
      auto ready = [&] { return generation_.load(std::memory_order_acquire) != seen; };
      const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(500);
      for (int i = 0; !ready(); ++i) {
        cpu_relax();
        if ((i & 255) == 255 && std::chrono::steady_clock::now() > until) {
          std::unique_lock<std::mutex> lk(mu_);
          wake_.wait(lk, ready);
          break;
        }
      }
      size_t helpers;
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (stop_) return;
        seen = generation_.load(std::memory_order_acquire);
        helpers = helpers_;
      }
      if (id >= helpers) continue;  // not needed for this call
      work();
      busy_.fetch_sub(1, std::memory_order_release);
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable wake_;
  std::vector<std::thread> workers_;
  const std::function<void(size_t)>* task_ = nullptr;
  size_t n_ = 0, helpers_ = 0;
  std::atomic<size_t> next_{0}, busy_{0};
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
  std::exception_ptr error_;
};

// A ParallelFor over `threads` threads of the shared pool (serial for one thread or one task).
inline ParallelFor spin_pool_for(int threads) {
  return [threads](size_t n, const std::function<void(size_t)>& task) {
    if (threads <= 1 || n <= 1) return serial_for(n, task);
    SpinPool::instance().run(threads, n, task);
  };
}

}  // namespace rbe
