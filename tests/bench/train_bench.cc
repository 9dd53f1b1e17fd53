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
#include "common/base/proc_stats.h"
#include "common/llm/layers.h"
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

// GFLOP/s of Y = X·Wᵀ (X m×k, W n×k) through the trainer's own product (layers.h's MatMulNT, in
// blocks over `threads`), W stored in `dtype`: the limit of a trainer's step with weights of that
// type. With f32 it is OpenBLAS's sgemm as the trainer calls it; with bf16/f16 it adds the
// conversion of each weight panel.
double GemmPeak(int m, int k, int n, int threads, DType dtype) {
  MatrixF x = MatrixF::Random(m, k), w = MatrixF::Random(n, k), y(m, n);
  std::vector<uint16_t> stored(static_cast<size_t>(w.size()));
  const std::span<const float> values(w.data(), static_cast<size_t>(w.size()));
  StoredSpan ws = values;
  if (dtype != DType::kF32) {
    FromF32(values, dtype, stored.data());
    ws = {stored.data(), dtype, stored.size()};
  }
  ThreadPool pool(threads);
  const auto run = [&] { MatMulNT(pool, x.data(), ws, y.data(), m, k, n, 1.0f, false); };
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
  double workspace_gb = 0;
};

Figure Measure(const LlamaWeights& w, const std::vector<LinearKind>& targets, int B, int T,
               int steps, int threads, bool checkpoint_activations) {
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
  auto result = Train(w, data,
                      {.batch = B,
                       .steps = steps + 1,
                       .lr = 1e-4,
                       .threads = threads,
                       .checkpoint_activations = checkpoint_activations},
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
  f.workspace_gb = static_cast<double>(result->workspace_bytes) / 1e9;
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "train_bench: trainer throughput on a SmolLM2-135M-shaped model (or another preset)"};
  std::string torch_python, preset = "smollm2-135m", dtype_name = "f32", model_dir;
  int steps = 3, threads = 2, only_seq = 0, batch = 4;
  bool qv_only = false, checkpoint_activations = false;
  app.add_option("--torch-python", torch_python, "python with torch, to run train_torch.py too");
  app.add_option("--steps", steps, "measured steps per case (after one warm-up step)")
      ->capture_default_str();
  app.add_option("--threads", threads, "threads for fedlora and PyTorch")->capture_default_str();
  app.add_option("--seq", only_seq, "measure only this sequence length");
  app.add_option("--preset", preset,
                 "architecture (init-model's presets); PyTorch's peer is SmolLM2-shaped only")
      ->capture_default_str();
  app.add_option("--dtype", dtype_name, "f32, bf16 or f16: the type the random weights are held in")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  app.add_option("--model", model_dir,
                 "a checkpoint directory (init-model's) to map instead of random weights in "
                 "memory; --preset and --dtype then only name it")
      ->check(CLI::ExistingDirectory);
  app.add_option("--batch", batch, "records per step")->capture_default_str();
  app.add_flag("--qv-only", qv_only, "measure LoRA on q,v only (not all seven linears too)");
  app.add_flag("--checkpoint-activations", checkpoint_activations,
               "recompute each layer's activations in the backward pass");
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
  const DType dtype = *ParseDType(dtype_name);
  auto read = model_dir.empty()
                  ? absl::StatusOr<LlamaWeights>(LlamaWeights::Random(*config, 1, 0.02f, dtype))
                  : LlamaWeights::Read(model_dir);
  if (!read.ok()) {
    std::fprintf(stderr, "%s\n", std::string(read.status().message()).c_str());
    return 1;
  }
  const LlamaWeights& w = *read;
  const int H = w.config().hidden_size, I = w.config().intermediate_size;
  std::printf(
      "## Trainer throughput, %s shape (%zu parameters, %s), batch %d, LoRA r 16, %d threads\n\n",
      preset.c_str(), w.num_parameters(), std::string(DTypeName(w.dtype())).c_str(), batch,
      threads);
  std::printf(
      "GEMM limit on this machine, Y = X·Wᵀ through the trainer's product (%d threads, "
      "GFLOP/s): f32 weights %.0f at 2048³ and %.0f at 256×%d×%d (the MLP's up projection); "
      "%s weights %.0f at 256×%d×%d\n\n",
      threads, GemmPeak(2048, 2048, 2048, threads, DType::kF32),
      GemmPeak(256, H, I, threads, DType::kF32), H, I, std::string(DTypeName(w.dtype())).c_str(),
      GemmPeak(256, H, I, threads, w.dtype()), H, I);
  std::fflush(stdout);
  std::printf(
      "| seq | targets | fedlora tokens/s | fedlora GFLOP/s | PyTorch tokens/s | ratio | fedlora "
      "CPU s/step | workspace GB | peak RSS GB |\n|---|---|---|---|---|---|---|---|---|\n");
  const std::vector<std::pair<std::string, std::vector<LinearKind>>> cases = {
      {"q,v", {LinearKind::kQ, LinearKind::kV}},
      {"all 7",
       {LinearKind::kQ, LinearKind::kK, LinearKind::kV, LinearKind::kO, LinearKind::kGate,
        LinearKind::kUp, LinearKind::kDown}}};
  for (int T : {128, 256}) {
    if (only_seq != 0 && T != only_seq) continue;
    for (const auto& [name, targets] : cases) {
      if (qv_only && name != "q,v") continue;
      const Figure f = Measure(w, targets, batch, T, steps, threads, checkpoint_activations);
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
      std::printf("| %d | %s | %.1f | %.0f | %s | %s | %.2f | %.2f | %.2f |\n", T, name.c_str(),
                  f.tokens_per_second, f.gflops, torch.c_str(), ratio.c_str(),
                  f.cpu_seconds_per_step, f.workspace_gb, StatusBytes("VmHWM:") / 1e9);
      std::fflush(stdout);
    }
  }
  return 0;
}
