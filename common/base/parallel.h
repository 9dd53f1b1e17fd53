// ParallelFor: runs fn(0..n-1) on up to `threads` std::threads (default: the machine's cores), each
// taking the next index as it finishes one. For coarse work items (an adapter module): no thread is
// started when n ≤ 1, and threads that finish early never spin, so small jobs stay as fast as
// serial ones.
//
// ThreadPool: the same fork-join loop over threads started once, for the trainer, which runs
// thousands of short parallel loops per step.
#ifndef FEDLORA_COMMON_BASE_PARALLEL_H_
#define FEDLORA_COMMON_BASE_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

namespace fedlora::common {

template <typename Fn>
void ParallelFor(size_t n, Fn&& fn, size_t threads = 0) {
  if (threads == 0) threads = std::max(1u, std::thread::hardware_concurrency());
  threads = std::min(threads, n);
  if (threads <= 1) {
    for (size_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<size_t> next{0};
  auto worker = [&] {
    for (size_t i = next++; i < n; i = next++) fn(i);
  };
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
}

class ThreadPool {
 public:
  // `threads` counts the calling thread; 0 means the machine's cores.
  explicit ThreadPool(int threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs fn(i, thread) for every i in [0, n) on the pool's threads and the caller, and returns
  // when all are done; `thread` in [0, size()) tells which thread runs it (for per-thread scratch).
  // Not reentrant: fn must not call For. Allocates nothing (fn is called through a pointer, not
  // copied into a std::function), so training steps can use it freely.
  template <typename Fn>
  void For(size_t n, Fn&& fn) {
    Dispatch(n, &fn, [](void* f, size_t i, int thread) { (*static_cast<Fn*>(f))(i, thread); });
  }

 private:
  void Work(int thread);
  void RunItems(int thread);
  void Dispatch(size_t n, void* fn, void (*call)(void*, size_t, int));

  std::mutex mu_;
  std::condition_variable wake_;
  std::condition_variable done_;
  void* fn_ = nullptr;                          // the callable of the current For
  void (*call_)(void*, size_t, int) = nullptr;  // and how to call it
  size_t n_ = 0;
  std::atomic<size_t> next_{0};
  uint64_t generation_ = 0;  // bumped by every For
  int pending_ = 0;          // workers still inside the current For
  bool stop_ = false;
  std::vector<std::thread> workers_;
};

inline ThreadPool::ThreadPool(int threads) {
  if (threads <= 0) threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  for (int t = 1; t < threads; ++t) workers_.emplace_back([this, t] { Work(t); });
}

inline ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  wake_.notify_all();
  for (std::thread& t : workers_) t.join();
}

inline void ThreadPool::RunItems(int thread) {
  for (size_t i = next_++; i < n_; i = next_++) call_(fn_, i, thread);
}

inline void ThreadPool::Dispatch(size_t n, void* fn, void (*call)(void*, size_t, int)) {
  if (workers_.empty() || n <= 1) {
    for (size_t i = 0; i < n; ++i) call(fn, i, 0);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = fn;
    call_ = call;
    n_ = n;
    next_ = 0;
    pending_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  wake_.notify_all();
  RunItems(0);
  std::unique_lock<std::mutex> lock(mu_);
  done_.wait(lock, [this] { return pending_ == 0; });
  fn_ = nullptr;
}

inline void ThreadPool::Work(int thread) {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      wake_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    RunItems(thread);
    std::lock_guard<std::mutex> lock(mu_);
    if (--pending_ == 0) done_.notify_one();
  }
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_PARALLEL_H_
