// generate_bench: decoding speed of `fedlora generate` — the KV-cache decoder (common/llm/decoder)
// against recomputing the whole sequence for every new token (LlamaRunner::NextTokenLogits, what
// `generate` did before the cache), on random models of the tiny preset and of SmolLM2-135M's
// shape, with a LoRA adapter on q and v. Greedy; EOS is never chosen (no eos ids), so every prompt
// gets all its new tokens. Also GenerateAll over many prompts, one decoder per core, as
// `generate --data` and `eval --accuracy` run. Prints a Markdown table.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <random>

#include "common/llm/decoder.h"
#include "common/llm/llama_config.h"

namespace {

using namespace fedlora::common;
using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

std::vector<std::vector<int32_t>> Prompts(int n, int length, int vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<int32_t>> prompts(static_cast<size_t>(n));
  for (auto& p : prompts)
    for (int i = 0; i < length; ++i) p.push_back(static_cast<int32_t>(rng() % vocab));
  return prompts;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"generate_bench: KV-cache decoding against full recomputation"};
  int prompt_length = 150, new_tokens = 32, many = 3000;
  std::string dtype_name = "f32";
  app.add_option("--prompt-length", prompt_length)->capture_default_str();
  app.add_option("--new-tokens", new_tokens)->capture_default_str();
  app.add_option("--many", many, "prompts for GenerateAll on the tiny model")
      ->capture_default_str();
  app.add_option("--dtype", dtype_name, "f32, bf16 or f16: the type the weights are held in")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  CLI11_PARSE(app, argc, argv);
  const DType dtype = *ParseDType(dtype_name);

  std::printf(
      "| model | prompt | new tokens | KV cache, 1 thread | no cache, all cores | speed-up |\n");
  std::printf("|---|---|---|---|---|---|\n");
  for (const char* preset : {"tiny", "smollm2-135m"}) {
    LlamaConfig c = *LlamaPreset(preset);
    if (c.vocab_size == 0) c.vocab_size = 459;  // the tiny preset's with 200 merges
    const LlamaWeights w = LlamaWeights::Random(c, 1, 0.02f, dtype);
    std::vector<ModuleShape> shapes;
    for (int l = 0; l < c.num_hidden_layers; ++l)
      for (LinearKind k : {LinearKind::kQ, LinearKind::kV})
        shapes.push_back({LinearPath(l, k), 16, LinearIn(c, k), LinearOut(c, k), 2.0, false});
    Adapter adapter = *Adapter::Create(shapes);
    std::mt19937_64 rng(2);
    std::normal_distribution<float> normal(0.0f, 0.02f);
    for (float& v : adapter.values()) v = normal(rng);
    const auto prompts = Prompts(c.hidden_size < 100 ? 32 : 2, prompt_length, c.vocab_size, 3);
    const SamplingOptions greedy{.max_new_tokens = new_tokens};

    // One thread, as GenerateAll gives each of as many prompts as cores.
    auto decoder = Decoder::Create(&w, &adapter, prompt_length + new_tokens, 1);
    auto t0 = Clock::now();
    size_t cached_tokens = 0;
    std::vector<std::vector<int32_t>> cached;
    for (const auto& p : prompts) {
      cached.push_back(*Generate(**decoder, p, {}, greedy, rng));
      cached_tokens += cached.back().size();
    }
    const double cached_s = Seconds(t0);

    auto runner =
        LlamaRunner::Create(&w, &adapter, {.max_batch = 1, .max_seq = prompt_length + new_tokens});
    t0 = Clock::now();
    size_t full_tokens = 0;
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::vector<int32_t> ids = prompts[i];
      for (int step = 0; step < new_tokens; ++step) {
        const std::vector<float> logits = *(*runner)->NextTokenLogits(ids);
        ids.push_back(
            static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin()));
      }
      full_tokens += new_tokens;
      if (std::vector<int32_t>(ids.begin() + prompt_length, ids.end()) != cached[i])
        std::printf("(prompt %zu: the two decodings differ)\n", i);
    }
    const double full_s = Seconds(t0);
    std::printf("| %s | %d | %d | %.1f tokens/s | %.1f tokens/s | %.1f× |\n", preset, prompt_length,
                new_tokens, cached_tokens / cached_s, full_tokens / full_s,
                (cached_tokens / cached_s) / (full_tokens / full_s));
  }
  // Many prompts at once on the tiny model, as `generate --data` and `eval --accuracy` run them.
  LlamaConfig c = *LlamaPreset("tiny");
  c.vocab_size = 459;
  const LlamaWeights w = LlamaWeights::Random(c, 1);
  const auto all = Prompts(many, prompt_length, c.vocab_size, 4);
  const auto t0 = Clock::now();
  const auto out = *GenerateAll(w, nullptr, all, {}, {.max_new_tokens = new_tokens});
  const double s = Seconds(t0);
  size_t n = 0;
  for (const auto& o : out) n += o.size();
  std::printf(
      "\nGenerateAll, tiny: %d prompts of %d tokens, %zu new tokens in %.2f s (%.0f tokens/s, "
      "%.2f ms a prompt) on all cores\n",
      many, prompt_length, n, s, n / s, 1000 * s / many);
  // One prompt on the SmolLM2 shape, as `generate --prompt` runs it: its decoder gets every core.
  LlamaConfig big = *LlamaPreset("smollm2-135m");
  const LlamaWeights wb = LlamaWeights::Random(big, 1);
  const auto one = Prompts(1, prompt_length, big.vocab_size, 5);
  const auto t1 = Clock::now();
  const auto single = *GenerateAll(wb, nullptr, one, {}, {.max_new_tokens = new_tokens});
  std::printf("GenerateAll, smollm2-135m, one prompt of %d tokens: %zu new tokens in %.2f s\n",
              prompt_length, single[0].size(), Seconds(t1));
  return 0;
}
