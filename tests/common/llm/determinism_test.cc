// Runs that reproduce to the bit: training (LoRA on all seven linears with gradient accumulation,
// LoRA-SB after its initialisation, DP-SGD with a test seed), evaluation, Fed-SB's sketches (with
// and without DP), the full forward's logits, the decoder's logits and generation, each with 1, 2,
// 3, 4 and all cores' threads, and again after the heap has been disturbed, and once more in
// another process. Unlike the other tests, these compare the code with itself: equality across
// thread counts, runs and processes is the property under test.
#include <gtest/gtest.h>

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "common/aggregation/sketch.h"
#include "common/llm/decoder.h"
#include "common/llm/llama_config.h"
#include "common/llm/trainer.h"
#include "tests/process.h"
#include "tests/scratch_dir.h"
#include "tests/test_util.h"

namespace fedlora::common {
namespace {

constexpr int kThreadCounts[] = {2, 3, 4, 0};  // after 1; 0: the machine's cores

// What a run produced: named arrays of floats, doubles or integers, kept as bytes.
struct Outcome {
  struct Part {
    std::string bytes;
    char type;  // 'f' float, 'd' double, 'i' integer
    size_t width;
  };
  std::map<std::string, Part> parts;

  template <typename T>
  void Add(const std::string& name, std::span<const T> values) {
    Part& p = parts
                  .try_emplace(name, Part{"",
                                          std::is_same_v<T, float>    ? 'f'
                                          : std::is_same_v<T, double> ? 'd'
                                                                      : 'i',
                                          sizeof(T)})
                  .first->second;
    p.bytes.append(reinterpret_cast<const char*>(values.data()), values.size_bytes());
  }
  template <typename T>
  void Add(const std::string& name, const T& value) {
    Add(name, std::span<const T>(&value, 1));
  }
  void Add(const std::string& name, const MatrixD& m) {
    Add(name, std::span<const double>(m.data(), static_cast<size_t>(m.size())));
  }
  std::string Serialise() const {
    std::string out;
    for (const auto& [name, p] : parts)
      out += name + "\n" + std::to_string(p.bytes.size()) + "\n" + p.bytes;
    return out;
  }
};

std::string Element(const Outcome::Part& p, size_t i) {
  std::ostringstream s;
  s.precision(17);
  if (p.type == 'f') {
    float x;
    std::memcpy(&x, p.bytes.data() + i * p.width, sizeof x);
    s << x;
  } else if (p.type == 'd') {
    double x;
    std::memcpy(&x, p.bytes.data() + i * p.width, sizeof x);
    s << x;
  } else {
    int64_t x = 0;
    std::memcpy(&x, p.bytes.data() + i * p.width, p.width);
    s << x;
  }
  return s.str();
}

// Equal to the bit; otherwise names the part and its first element that differs.
::testing::AssertionResult SameBits(const Outcome& want, const Outcome& got) {
  for (const auto& [name, p] : want.parts) {
    auto it = got.parts.find(name);
    if (it == got.parts.end()) return ::testing::AssertionFailure() << "no " << name;
    const Outcome::Part& q = it->second;
    if (q.bytes == p.bytes) continue;
    const size_t n = std::min(p.bytes.size(), q.bytes.size()) / p.width;
    size_t i = 0;
    while (i < n &&
           std::memcmp(p.bytes.data() + i * p.width, q.bytes.data() + i * p.width, p.width) == 0)
      ++i;
    auto failure = ::testing::AssertionFailure()
                   << name << " differs at element " << i << " of " << p.bytes.size() / p.width;
    if (i < n) failure << ": " << Element(p, i) << " vs " << Element(q, i);
    return failure;
  }
  return ::testing::AssertionSuccess();
}

// run(threads) on one thread, then with every other thread count, then twice more after
// disturbing the heap (one thread again, then two); each outcome must equal the first.
template <typename Run>
void ExpectSameForEveryThreadCount(const Run& run) {
  const Outcome first = run(1);
  for (int threads : kThreadCounts)
    EXPECT_TRUE(SameBits(first, run(threads))) << threads << " threads";
  for (uint64_t seed : {1, 2}) {
    const testing::HeapShift shift(seed);
    EXPECT_TRUE(SameBits(first, run(seed == 1 ? 1 : 2)))
        << "after disturbing the heap (" << seed << ")";
  }
}

LlamaConfig Config(const std::string& preset) {
  LlamaConfig c = *LlamaPreset(preset);
  c.vocab_size = 301;
  return c;
}

// Random sequences of 20–57 tokens whose first quarter carries no loss (a prompt).
std::vector<Example> Data(const LlamaConfig& c, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Example> out;
  for (int i = 0; i < n; ++i) {
    Example e;
    const int len = 20 + static_cast<int>(rng() % 38);
    for (int t = 0; t < len; ++t) e.input_ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
    e.labels = e.input_ids;
    for (int t = 0; t < len / 4; ++t) e.labels[t] = -100;
    out.push_back(std::move(e));
  }
  return out;
}

constexpr std::initializer_list<LinearKind> kAllLinears = {
    LinearKind::kQ,    LinearKind::kK,  LinearKind::kV,   LinearKind::kO,
    LinearKind::kGate, LinearKind::kUp, LinearKind::kDown};

Adapter TrainedLookingAdapter(const LlamaConfig& c, uint64_t seed) {
  Adapter a = *NewAdapter(c, {.rank = 4, .alpha = 8, .targets = kAllLinears}, seed, "");
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.05f);
  for (size_t i = 0; i < a.num_modules(); ++i)
    for (float& x : a.B(i).reshaped()) x = normal(rng);
  return a;
}

Adapter RandomLoraSb(const LlamaConfig& c, uint64_t seed) {
  Adapter a =
      *NewAdapter(c, {.rank = 4, .alpha = 4, .targets = kAllLinears, .lora_sb = true}, 1, "");
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.2f);
  for (float& x : a.values()) x = normal(rng);
  return a;
}

enum class Mode { kLora, kLoraSb, kDpSgd };

class TrainingDeterminismTest : public ::testing::TestWithParam<std::tuple<const char*, Mode>> {};

TEST_P(TrainingDeterminismTest, TheSameForEveryThreadCount) {
  const auto [preset, mode] = GetParam();
  const LlamaConfig c = Config(preset);
  const LlamaWeights w = LlamaWeights::Random(c, 3, 0.2f);
  const std::vector<Example> data = Data(c, 24, 5);
  ExpectSameForEveryThreadCount([&](int threads) {
    Outcome out;
    Adapter adapter = *NewAdapter(c,
                                  {.rank = 4,
                                   .alpha = mode == Mode::kLoraSb ? 4.0 : 8.0,
                                   .targets = kAllLinears,
                                   .lora_sb = mode == Mode::kLoraSb},
                                  9, "");
    if (mode == Mode::kLoraSb) {
      EXPECT_TRUE(InitLoraSb(w, data, 1e-3, 4, threads, adapter).ok());
      out.Add("initialised adapter", std::span<const float>(adapter.values()));
    }
    TrainOptions o{.batch = 3,
                   .grad_accum = 2,
                   .steps = 4,
                   .lr = 1e-2,
                   .weight_decay = 0.01,
                   .warmup_ratio = 0.25,
                   .max_grad_norm = 0.5,
                   .seed = 11,
                   .threads = threads};
    if (mode == Mode::kDpSgd)
      o.dp = {.noise_multiplier = 0.7, .clip = 0.05, .sample_rate = 0.3, .test_seed = 13};
    auto result = Train(w, data, o, adapter, [&](const StepReport& r) {
      out.Add("step loss", r.loss);
      out.Add("step grad norm", r.grad_norm);
    });
    EXPECT_TRUE(result.ok()) << result.status();
    out.Add("adapter", std::span<const float>(adapter.values()));
    out.Add("first loss", result->first_loss);
    out.Add("final loss", result->final_loss);
    return out;
  });
}

// "tiny-qwen3" → "tinyqwen3": gtest names are letters, digits and '_'.
std::string TestName(const std::string& preset) {
  std::string name;
  for (char ch : preset)
    if (std::isalnum(static_cast<unsigned char>(ch))) name += ch;
  return name;
}

INSTANTIATE_TEST_SUITE_P(Families, TrainingDeterminismTest,
                         ::testing::Combine(::testing::Values("tiny", "tiny-llama3", "tiny-mistral",
                                                              "tiny-qwen2", "tiny-qwen3"),
                                            ::testing::Values(Mode::kLora, Mode::kLoraSb,
                                                              Mode::kDpSgd)),
                         [](const auto& info) {
                           const Mode mode = std::get<1>(info.param);
                           return TestName(std::get<0>(info.param)) + "_" +
                                  (mode == Mode::kLora     ? "Lora"
                                   : mode == Mode::kLoraSb ? "LoraSb"
                                                           : "DpSgd");
                         });

class DeterminismTest : public ::testing::TestWithParam<const char*> {};

TEST_P(DeterminismTest, EvaluationIsTheSameForEveryThreadCount) {
  const LlamaConfig c = Config(GetParam());
  const LlamaWeights w = LlamaWeights::Random(c, 3, 0.2f);
  const Adapter adapter = TrainedLookingAdapter(c, 4);
  const std::vector<Example> data = Data(c, 21, 6);
  ExpectSameForEveryThreadCount([&](int threads) {
    Outcome out;
    for (const Adapter* a : {static_cast<const Adapter*>(nullptr), &adapter}) {
      auto loss = Evaluate(w, a, data, 8, threads);
      EXPECT_TRUE(loss.ok()) << loss.status();
      out.Add("loss sum", loss->sum);
      out.Add("tokens", loss->tokens);
    }
    return out;
  });
}

TEST_P(DeterminismTest, SketchesAreTheSameForEveryThreadCount) {
  const LlamaConfig c = Config(GetParam());
  const LlamaWeights w = LlamaWeights::Random(c, 3, 0.2f);
  const Adapter layout = *NewAdapter(c, {.rank = 4, .targets = kAllLinears}, 1, "");
  const std::vector<Example> data = Data(c, 10, 7);
  std::mt19937_64 rng(8);
  std::normal_distribution<double> normal;
  std::vector<MatrixD> bases;
  for (const LoraModule& m : layout.modules()) {
    MatrixD omega(m.in_features, 3);
    for (double& x : omega.reshaped()) x = normal(rng);
    bases.push_back(OrthonormalBasis(omega));
  }
  const TrainOptions::DpSgd dp{.noise_multiplier = 0.7, .clip = 0.05, .test_seed = 13};
  ExpectSameForEveryThreadCount([&](int threads) {
    Outcome out;
    for (const TrainOptions::DpSgd& privacy : {TrainOptions::DpSgd{}, dp}) {
      auto sketch =
          SketchGradients(w, data, layout, SketchStep::kRange, bases, 4, threads, privacy);
      EXPECT_TRUE(sketch.ok()) << sketch.status();
      for (const MatrixD& s : *sketch)
        out.Add(privacy.noise_multiplier < 0 ? "sketch" : "private sketch", s);
    }
    return out;
  });
}

TEST_P(DeterminismTest, LogitsAndGenerationAreTheSameForEveryThreadCount) {
  const LlamaConfig c = Config(GetParam());
  const LlamaWeights w = LlamaWeights::Random(c, 3, 0.3f);
  const Adapter lora = TrainedLookingAdapter(c, 4), lora_sb = RandomLoraSb(c, 2);
  std::vector<std::vector<int32_t>> prompts;
  for (const Example& e : Data(c, 5, 9)) prompts.push_back(e.input_ids);
  ExpectSameForEveryThreadCount([&](int threads) {
    Outcome out;
    for (const Adapter* adapter : {&lora, &lora_sb}) {
      auto runner =
          LlamaRunner::Create(&w, adapter, {.max_batch = 1, .max_seq = 80, .threads = threads});
      EXPECT_TRUE(runner.ok()) << runner.status();
      for (const auto& prompt : prompts) {
        auto logits = (*runner)->NextTokenLogits(prompt);
        EXPECT_TRUE(logits.ok()) << logits.status();
        out.Add("full forward's logits", std::span<const float>(*logits));
      }
      auto generated = GenerateAll(w, adapter, prompts, {}, {.max_new_tokens = 12}, 0, threads);
      EXPECT_TRUE(generated.ok()) << generated.status();
      for (const auto& ids : *generated) out.Add("generated", std::span<const int32_t>(ids));
      // One decoder on `threads` threads, every step's logits.
      auto decoder = Decoder::Create(&w, adapter, 80, threads);
      EXPECT_TRUE(decoder.ok()) << decoder.status();
      std::mt19937_64 rng(1);
      auto ids =
          Generate(**decoder, prompts[0], {}, {.max_new_tokens = 12}, rng,
                   [&](std::span<const float> logits) { out.Add("decoder's logits", logits); });
      EXPECT_TRUE(ids.ok()) << ids.status();
    }
    return out;
  });
}

INSTANTIATE_TEST_SUITE_P(Families, DeterminismTest,
                         ::testing::Values("tiny", "tiny-llama3", "tiny-mistral", "tiny-qwen2",
                                           "tiny-qwen3"),
                         [](const auto& info) { return TestName(info.param); });

// The outcome of training on tiny-qwen3 (LoRA on every linear, two threads), serialised.
std::string TrainingOutcome() {
  const LlamaConfig c = Config("tiny-qwen3");
  const LlamaWeights w = LlamaWeights::Random(c, 3, 0.2f);
  Adapter adapter = *NewAdapter(c, {.rank = 4, .alpha = 8, .targets = kAllLinears}, 9, "");
  auto result = Train(w, Data(c, 24, 5),
                      {.batch = 3, .grad_accum = 2, .steps = 3, .lr = 1e-2, .threads = 2}, adapter);
  EXPECT_TRUE(result.ok()) << result.status();
  Outcome out;
  out.Add("adapter", std::span<const float>(adapter.values()));
  out.Add("final loss", result->final_loss);
  return out.Serialise();
}

constexpr char kOutcomeFileVariable[] = "FEDLORA_DETERMINISM_OUTCOME";

TEST(DeterminismAcrossProcessesTest, AnotherProcessTrainsTheSameAdapter) {
  if (const char* file = std::getenv(kOutcomeFileVariable)) {  // the child: write, and stop there
    std::ofstream(file, std::ios::binary) << TrainingOutcome();
    return;
  }
  const testing::ScratchDir dir;
  const std::filesystem::path file = dir / "outcome";
  ASSERT_EQ(::setenv(kOutcomeFileVariable, file.c_str(), 1), 0);
  const pid_t child = testing::Start(
      {"/proc/self/exe", "--gtest_filter=DeterminismAcrossProcessesTest.*"}, dir / "log");
  ::unsetenv(kOutcomeFileVariable);
  ASSERT_GT(child, 0);
  ASSERT_EQ(testing::Wait(child, std::chrono::seconds(120)), 0);
  std::ifstream in(file, std::ios::binary);
  const std::string theirs((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const testing::HeapShift shift(3);
  const std::string ours = TrainingOutcome();
  ASSERT_FALSE(ours.empty());
  EXPECT_TRUE(theirs == ours) << "the other process's adapter or loss differs";
}

}  // namespace
}  // namespace fedlora::common
