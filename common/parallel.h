// ParallelFor: runs fn(0..n-1) on up to `threads` std::threads (default: the machine's cores), each
// taking the next index as it finishes one. For coarse work items (an adapter module): no thread is
// started when n ≤ 1, and threads that finish early never spin, so small jobs stay as fast as
// serial ones.
#ifndef FEDLORA_COMMON_PARALLEL_H_
#define FEDLORA_COMMON_PARALLEL_H_

#include <algorithm>
#include <atomic>
#include <cstddef>
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

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_PARALLEL_H_
