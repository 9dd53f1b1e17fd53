// The KV-cache decoder against LlamaRunner's full forward (no cache), step by step, on every
// family preset: the same logits to float rounding, and greedy decoding = the full forward's
// argmax at every step. And sampling against its definition.
#include "common/llm/decoder.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "common/llm/llama_config.h"

namespace fedlora::common {
namespace {

Adapter RandomAdapter(const LlamaConfig& c, bool lora_sb, uint64_t seed) {
  std::vector<ModuleShape> shapes;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int k = 0; k < kNumLinearKinds; ++k) {
      const auto kind = static_cast<LinearKind>(k);
      shapes.push_back(
          {LinearPath(l, kind), 4, LinearIn(c, kind), LinearOut(c, kind), 1.5, lora_sb});
    }
  Adapter a = *Adapter::Create(shapes);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (float& v : a.values()) v = normal(rng);
  return a;
}

class DecoderTest : public ::testing::TestWithParam<std::tuple<const char*, bool>> {};

TEST_P(DecoderTest, GreedyIsTheFullForwardsArgmaxStepByStep) {
  const auto [preset, lora_sb] = GetParam();
  LlamaConfig c = *LlamaPreset(preset);
  c.vocab_size = 89;
  // Wide weights, so that the logits are far from uniform and ties cannot decide the argmax.
  const LlamaWeights w = LlamaWeights::Random(c, 7, 0.3f);
  const Adapter adapter = RandomAdapter(c, lora_sb, 11);
  // 40 prompt tokens and 30 new ones: beyond tiny-mistral's window of 32 and tiny-llama3's
  // original context of 64.
  std::mt19937_64 rng(3);
  std::vector<int32_t> ids;
  for (int i = 0; i < 40; ++i) ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
  const std::vector<int32_t> prompt = ids;
  auto decoder = Decoder::Create(&w, &adapter, 80);
  ASSERT_TRUE(decoder.ok()) << decoder.status();
  auto runner = LlamaRunner::Create(&w, &adapter, {.max_batch = 1, .max_seq = 80, .threads = 1});
  ASSERT_TRUE(runner.ok()) << runner.status();
  int steps = 0;
  double worst = 0;
  auto out = Generate(**decoder, prompt, {}, {.max_new_tokens = 30}, rng,
                      [&](std::span<const float> logits) {
                        auto full = (*runner)->NextTokenLogits(ids);
                        ASSERT_TRUE(full.ok()) << full.status();
                        float scale = 0;
                        for (float v : *full) scale = std::max(scale, std::abs(v));
                        for (size_t i = 0; i < full->size(); ++i)
                          worst = std::max<double>(worst, std::abs(logits[i] - (*full)[i]) / scale);
                        const auto argmax = std::max_element(full->begin(), full->end());
                        ids.push_back(static_cast<int32_t>(argmax - full->begin()));
                        ++steps;
                      });
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(steps, 30);
  // Both are float32, summed in other orders (the cache's products with one row against the full
  // forward's with the sequence): 1.02e-5 was seen once in 30 runs on a busy machine, when
  // OpenBLAS's own threads still split the products. A wrong position or a stale cache entry is of
  // order 1.
  EXPECT_LT(worst, 5e-5) << "largest logit difference relative to the largest logit";
  EXPECT_EQ(*out, std::vector<int32_t>(ids.begin() + 40, ids.end()));
  // Appending one token at a time gives what the prompt at once gave.
  (*decoder)->Reset();
  std::span<const float> last;
  for (int32_t id : prompt) last = *(*decoder)->Append(std::span<const int32_t>(&id, 1));
  auto whole = (*runner)->NextTokenLogits(prompt);
  for (size_t i = 0; i < whole->size(); ++i) EXPECT_NEAR(last[i], (*whole)[i], 1e-4);
}

INSTANTIATE_TEST_SUITE_P(Families, DecoderTest,
                         ::testing::Combine(::testing::Values("tiny", "tiny-llama3", "tiny-mistral",
                                                              "tiny-qwen2", "tiny-qwen3"),
                                            ::testing::Bool()));

TEST(DecoderTest, StopsAtEosAndRefusesWhatDoesNotFit) {
  LlamaConfig c = *LlamaPreset("tiny");
  c.vocab_size = 50;
  const LlamaWeights w = LlamaWeights::Random(c, 1, 0.3f);
  auto decoder = Decoder::Create(&w, nullptr, 16);
  ASSERT_TRUE(decoder.ok());
  std::mt19937_64 rng(1);
  const std::vector<int32_t> prompt = {1, 2, 3};
  auto greedy = Generate(**decoder, prompt, {}, {.max_new_tokens = 5}, rng);
  ASSERT_TRUE(greedy.ok());
  ASSERT_EQ(greedy->size(), 5u);
  // With its third token as EOS, generation ends there, EOS kept.
  const std::vector<int32_t> eos = {(*greedy)[2]};
  auto stopped = Generate(**decoder, prompt, eos, {.max_new_tokens = 5}, rng);
  ASSERT_TRUE(stopped.ok());
  const size_t first = std::find(greedy->begin(), greedy->end(), eos[0]) - greedy->begin();
  EXPECT_EQ(*stopped, std::vector<int32_t>(greedy->begin(), greedy->begin() + first + 1));
  EXPECT_FALSE(Generate(**decoder, prompt, {}, {.max_new_tokens = 15}, rng).ok());
  EXPECT_FALSE(Decoder::Create(&w, nullptr, c.max_position_embeddings + 1).ok());
  const std::vector<int32_t> bad = {50};
  EXPECT_FALSE((*decoder)->Append(bad).ok());
}

TEST(SampleTokenTest, FollowsTemperatureAndTopP) {
  // Probabilities at T = 1: softmax(log(0.5, 0.3, 0.15, 0.05)).
  const std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f),
                                     std::log(0.05f)};
  std::mt19937_64 rng(5);
  const int n = 200000;
  auto frequencies = [&](SamplingOptions o) {
    std::vector<double> f(4, 0);
    for (int i = 0; i < n; ++i) f[SampleToken(logits, o, rng)] += 1.0 / n;
    return f;
  };
  EXPECT_EQ(SampleToken(logits, {}, rng), 0);  // temperature 0: argmax
  // top_p 0.8: {0.5, 0.3} reach 0.8; renormalised 0.625, 0.375.
  const auto nucleus = frequencies({.temperature = 1, .top_p = 0.8});
  EXPECT_NEAR(nucleus[0], 0.625, 0.005);
  EXPECT_NEAR(nucleus[1], 0.375, 0.005);
  EXPECT_EQ(nucleus[2] + nucleus[3], 0);
  // top_p 0.81 takes the token that crosses it: {0.5, 0.3, 0.15}.
  EXPECT_GT(frequencies({.temperature = 1, .top_p = 0.81})[2], 0.1);
  // T = 0.5 squares the probabilities: 0.25, 0.09, 0.0225, 0.0025 over 0.365.
  const auto sharp = frequencies({.temperature = 0.5});
  const double z = 0.25 + 0.09 + 0.0225 + 0.0025;
  for (int i = 0; i < 4; ++i) {
    const double p = std::pow(std::exp(logits[i]), 2) / z;
    EXPECT_NEAR(sharp[i], p, 4 * std::sqrt(p * (1 - p) / n)) << i;
  }
}

}  // namespace
}  // namespace fedlora::common
