// A training step allocates nothing: every operator new of this test binary is counted, and the
// count must not move between the end of the second step and the end of the last.
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <random>

#include "common/llm/trainer.h"
#include "tests/test_util.h"

namespace {
std::atomic<int64_t> allocations{0};
}  // namespace

// AddressSanitizer brings its own operator new; counting is for the plain build.
#ifndef __SANITIZE_ADDRESS__
void* operator new(std::size_t size) {
  allocations.fetch_add(1, std::memory_order_relaxed);
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return ::operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
#endif

namespace fedlora::common {
namespace {

TEST(AllocationTest, TrainingStepsAllocateNothing) {
#ifdef __SANITIZE_ADDRESS__
  GTEST_SKIP() << "operator new is AddressSanitizer's in this build";
#endif
  const LlamaConfig c = testing::TinyLlama(50, /*tied=*/false);
  const LlamaWeights w = LlamaWeights::Random(c, 1);
  std::mt19937_64 rng(3);
  std::vector<Example> data(40);
  for (Example& e : data) {
    const size_t n = 5 + rng() % 20;  // varied lengths: batches of different shapes
    for (size_t t = 0; t < n; ++t) e.input_ids.push_back(static_cast<int32_t>(rng() % 50));
    e.labels = e.input_ids;
  }
  for (bool lora_sb : {false, true}) {
    Adapter adapter = *NewAdapter(c,
                                  {.rank = 4,
                                   .alpha = 8,
                                   .targets = {LinearKind::kQ, LinearKind::kV, LinearKind::kDown},
                                   .lora_sb = lora_sb},
                                  1, "");
    int64_t after_second = -1, after_last = -1;
    auto result = Train(w, data, {.batch = 4, .grad_accum = 2, .steps = 8, .threads = 2}, adapter,
                        [&](const StepReport& r) {
                          if (r.step == 2) after_second = allocations.load();
                          if (r.step == r.steps) after_last = allocations.load();
                        });
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_GE(after_second, 0);
    EXPECT_EQ(after_last, after_second) << (lora_sb ? "lora-sb" : "lora") << ": "
                                        << after_last - after_second << " allocations in steps 3-8";
  }
}

}  // namespace
}  // namespace fedlora::common
