// train_bench: training throughput of fedlora's trainer on a SmolLM2-135M-shaped model (random
// weights; 30 layers, hidden 576, 9 query / 3 kv heads, vocab 49152, tied head), batch 4,
// sequences of 128 and 256 tokens, LoRA r = 16 on q,v and on all seven linears — next to this
// machine's fp32 GEMM peak (OpenBLAS and Eigen, split over threads as the trainer splits) and,
// with --torch-python, PyTorch training the same model the same way in the same run
// (tests/bench/train_torch.py). Prints a Markdown table.
//
// FLOPs counted per step, as the trainer computes them: frozen linears 2·N·P forward and 2·N·P for
// the input gradient (no weight gradient), the LM head 4·N'·V·H over the N' positions with a
// target, attention 12·B·Hq·T²·D (full T×T products, forward and backward), LoRA
// 6·N·r·(in + out) per module.
#include <cblas.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <random>

#include "common/base/parallel.h"
#include "common/llm/trainer.h"
#include "common/llm/workspace.h"

namespace {

using namespace fedlora::common;

double StepFlops(const LlamaConfig& c, const Adapter& a, int B, int T) {
  const double N = static_cast<double>(B) * T, Nt = static_cast<double>(B) * (T - 1);
  double linear = 0;
  for (int k = 0; k < kNumLinearKinds; ++k)
    linear += static_cast<double>(LinearIn(c, static_cast<LinearKind>(k))) *
              LinearOut(c, static_cast<LinearKind>(k));
  linear *= c.num_hidden_layers;
  double lora = 0;
  for (const LoraModule& m : a.modules())
    lora += 6.0 * N * m.rank * (m.in_features + m.out_features);
  const double attention = 12.0 * B * c.num_attention_heads * T * static_cast<double>(T) *
                           c.head_dim * c.num_hidden_layers;
  return 4.0 * N * linear + 4.0 * Nt * c.vocab_size * c.hidden_size + attention + lora;
}

// GFLOP/s of C = A·Bᵀ (row-major, m×k by n×k, as the trainer's products), in blocks of kRowBlock
// rows over `threads`, as the trainer splits them: with OpenBLAS's sgemm, which the trainer uses,
// or with Eigen's.
double GemmPeak(int m, int k, int n, int threads, bool openblas) {
  MatrixF a = MatrixF::Random(m, k), b = MatrixF::Random(n, k), c(m, n);
  ThreadPool pool(threads);
  auto run = [&] {
    ForBlocks(pool, m, kRowBlock, [&](int64_t r0, int64_t r1) {
      const int64_t rn = r1 - r0;
      if (openblas)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rn, n, k, 1.0f, a.data() + r0 * k, k,
                    b.data(), k, 0.0f, c.data() + r0 * n, n);
      else
        c.middleRows(r0, rn).noalias() = a.middleRows(r0, rn) * b.transpose();
    });
  };
  run();
  const int reps = 10;
  const auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) run();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return 2.0 * m * k * n * reps / s / 1e9;
}

// CPU time of the whole process (every thread) so far: what a step costs even when other programs
// share the cores, which wall-clock tokens/s does not show.
double ProcessCpuSeconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_utime.tv_sec + u.ru_stime.tv_sec) +
         1e-6 * static_cast<double>(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

struct Figure {
  double tokens_per_second = 0;
  double cpu_seconds_per_step = 0;
  double gflops = 0;
  double loss = 0;
};

Figure Measure(const LlamaWeights& w, const std::vector<LinearKind>& targets, int B, int T,
               int steps, int threads) {
  Adapter adapter = *NewAdapter(w.config(), {.rank = 16, .alpha = 32, .targets = targets}, 1, "");
  std::mt19937_64 rng(7);
  std::vector<Example> data(static_cast<size_t>(B) * (steps + 1));
  for (Example& e : data) {
    for (int t = 0; t < T; ++t)
      e.input_ids.push_back(static_cast<int32_t>(rng() % w.config().vocab_size));
    e.labels = e.input_ids;
  }
  std::vector<double> at, cpu;  // wall-clock and CPU seconds at the end of each step
  Figure f;
  auto result = Train(w, data, {.batch = B, .steps = steps + 1, .lr = 1e-4, .threads = threads},
                      adapter, [&](const StepReport& r) {
                        at.push_back(r.seconds);
                        cpu.push_back(ProcessCpuSeconds());
                        f.loss = r.loss;
                      });
  if (!result.ok()) {
    std::fprintf(stderr, "%s\n", std::string(result.status().message()).c_str());
    std::exit(1);
  }
  const double seconds = at.back() - at.front();  // the first step warms up
  f.tokens_per_second = static_cast<double>(B) * T * steps / seconds;
  f.gflops = StepFlops(w.config(), adapter, B, T) * steps / seconds / 1e9;
  f.cpu_seconds_per_step = (cpu.back() - cpu.front()) / steps;
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "train_bench: trainer throughput on a SmolLM2-135M-shaped model (or another preset)"};
  std::string torch_python, preset = "smollm2-135m";
  int steps = 3, threads = 2, only_seq = 0;
  app.add_option("--torch-python", torch_python, "python with torch, to run train_torch.py too");
  app.add_option("--steps", steps, "measured steps per case (after one warm-up step)")
      ->capture_default_str();
  app.add_option("--threads", threads, "threads for fedlora and PyTorch")->capture_default_str();
  app.add_option("--seq", only_seq, "measure only this sequence length");
  app.add_option("--preset", preset,
                 "architecture (init-model's presets); PyTorch's peer is SmolLM2-shaped only")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (!torch_python.empty() && preset != "smollm2-135m") {
    std::fprintf(stderr, "--torch-python compares the smollm2-135m preset only\n");
    return 2;
  }
  auto config = LlamaPreset(preset);
  if (!config.ok() || config->vocab_size == 0) {
    std::fprintf(stderr, "--preset: a preset with a vocabulary, one of %s\n",
                 LlamaPresetNames().c_str());
    return 2;
  }

  openblas_set_num_threads(1);  // as the trainer runs it: one OpenBLAS thread per call
  const LlamaWeights w = LlamaWeights::Random(*config, 1);
  std::printf(
      "## Trainer throughput, %s shape (%zu parameters), batch 4, LoRA r 16, %d threads\n\n",
      preset.c_str(), w.num_parameters(), threads);
  std::printf(
      "fp32 GEMM on this machine, C = A·Bᵀ, blocks of %d rows over %d threads (GFLOP/s): "
      "OpenBLAS (one thread per call, as the trainer) %.0f at 2048³ and %.0f at 1024×576×1536 (a "
      "trainer shape), %.0f on 1 thread; Eigen %.0f at 2048³\n\n",
      static_cast<int>(kRowBlock), threads, GemmPeak(2048, 2048, 2048, threads, true),
      GemmPeak(1024, 576, 1536, threads, true), GemmPeak(2048, 2048, 2048, 1, true),
      GemmPeak(2048, 2048, 2048, threads, false));
  std::fflush(stdout);
  std::printf(
      "| seq | targets | fedlora tokens/s | fedlora GFLOP/s | PyTorch tokens/s | ratio | fedlora "
      "CPU s/step |\n|---|---|---|---|---|---|---|\n");
  const std::vector<std::pair<std::string, std::vector<LinearKind>>> cases = {
      {"q,v", {LinearKind::kQ, LinearKind::kV}},
      {"all 7",
       {LinearKind::kQ, LinearKind::kK, LinearKind::kV, LinearKind::kO, LinearKind::kGate,
        LinearKind::kUp, LinearKind::kDown}}};
  for (int T : {128, 256}) {
    if (only_seq != 0 && T != only_seq) continue;
    for (const auto& [name, targets] : cases) {
      const Figure f = Measure(w, targets, 4, T, steps, threads);
      std::string torch = "—", ratio = "—";
      if (!torch_python.empty()) {
        // OpenBLAS single-threaded under torch's 2 intra-op threads is PyTorch's fastest setting
        // here (113 tokens/s against 65 with OpenBLAS's own 2 threads at seq 128, q,v).
        const std::string cmd = "OPENBLAS_NUM_THREADS=1 " + torch_python + " " +
                                FEDLORA_SOURCE_DIR + "/tests/bench/train_torch.py --seq " +
                                std::to_string(T) + " --targets " + (name == "q,v" ? "qv" : "all") +
                                " --steps " + std::to_string(steps) + " --threads " +
                                std::to_string(threads);
        std::FILE* pipe = popen(cmd.c_str(), "r");
        std::string out;
        char buf[4096];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) out.append(buf, n);
        pclose(pipe);
        const size_t brace = out.rfind('{');
        if (brace != std::string::npos) {
          const double tps = nlohmann::json::parse(out.substr(brace))["tokens_per_second"];
          char b1[64], b2[64];
          std::snprintf(b1, sizeof b1, "%.0f", tps);
          std::snprintf(b2, sizeof b2, "%.2f×", f.tokens_per_second / tps);
          torch = b1;
          ratio = b2;
        } else {
          torch = "failed";
          std::fprintf(stderr, "%s\n", out.c_str());
        }
      }
      std::printf("| %d | %s | %.0f | %.0f | %s | %s | %.2f |\n", T, name.c_str(),
                  f.tokens_per_second, f.gflops, torch.c_str(), ratio.c_str(),
                  f.cpu_seconds_per_step);
      std::fflush(stdout);
    }
  }
  return 0;
}
