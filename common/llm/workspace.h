// The working memory of the model's forward and backward passes, and how their work is cut for
// threads — the two things that decide whether a result depends on the thread count or on where
// the heap put a buffer (the rule is at the top of llama.h).
//
// AlignedFloats starts every buffer on a 64-byte boundary: Eigen's vectorised loops (sums, maxima,
// exp) handle the elements before the first packet boundary one at a time, with another summation
// order and another exp than the packets use, so where a row starts decides its result to the last
// bit. With aligned buffers that is a fixed function of the row's offset.
//
// ForBlocks cuts [0, total) into blocks of a fixed size and hands them to the pool's threads:
// OpenBLAS's sgemm computes a row of a product differently depending on how many rows the call
// holds (its kernels tile the rows, and a row's tile decides its arithmetic), so the blocks, not
// the threads, must decide the calls.
#ifndef FEDLORA_COMMON_LLM_WORKSPACE_H_
#define FEDLORA_COMMON_LLM_WORKSPACE_H_

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

#include "common/base/parallel.h"

namespace fedlora::common {

inline constexpr size_t kBufferAlignment = 64;  // bytes: a cache line, and AVX-512's packet

template <typename T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <typename U>
  AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kBufferAlignment)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(kBufferAlignment)); }
  template <typename U>
  bool operator==(const AlignedAllocator<U>&) const {
    return true;
  }
};

using AlignedFloats = std::vector<float, AlignedAllocator<float>>;

// Rows of a product per block: large enough that each sgemm call's packing of the weight is paid
// over many rows, small enough that a batch of a few sequences gives every core a block.
inline constexpr int64_t kRowBlock = 128;
// Columns per block of a weight-gradient product (Xᵀ·Y), and of a product whose rows fit in one
// row block (it is split by its output columns instead).
inline constexpr int64_t kColumnBlock = 128;
// Elements per block of an elementwise pass; a multiple of 16 floats, so that every block of an
// aligned buffer starts aligned.
inline constexpr int64_t kElementBlock = 16384;

// fn(begin, end) for the blocks [0, block), [block, 2·block), ... of [0, total), on the pool's
// threads. Which thread runs a block varies; what a block computes does not.
template <typename Fn>
void ForBlocks(ThreadPool& pool, int64_t total, int64_t block, Fn&& fn) {
  const int64_t blocks = (total + block - 1) / block;
  pool.For(static_cast<size_t>(blocks), [&](size_t i, int) {
    const int64_t begin = static_cast<int64_t>(i) * block;
    fn(begin, std::min(total, begin + block));
  });
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_WORKSPACE_H_
