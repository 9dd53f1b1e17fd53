// Local fine-tuning of a Llama model's adapter: LoRA (A and B trained) or LoRA-SB (only R), with
// AdamW, a warmup + linear/cosine schedule, gradient accumulation and gradient-norm clipping.
//
// Parameters, gradients and both Adam moments share the adapter's layout (one buffer each, carved
// by the adapter's module table), and the optimiser walks the trainable ranges of that table; the
// runner's workspace is allocated once, so a step allocates nothing. Training, evaluation,
// LoRA-SB's initialisation and the sketches give the same bits for every thread count (llama.h
// says why); with DP-SGD, so do runs with the same test_seed.
#ifndef FEDLORA_COMMON_LLM_TRAINER_H_
#define FEDLORA_COMMON_LLM_TRAINER_H_

#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/sketch.h"
#include "common/llm/dataset.h"
#include "common/llm/llama.h"
#include "common/tensor/adapter.h"

namespace fedlora::common {

// A model directory: weights, and the tokenizer and token conventions its data is read with.
struct Model {
  LlamaWeights weights;
  std::unique_ptr<Tokenizer> tokenizer;  // null when the directory has no tokenizer.json
  Tokens tokens;                         // EOS from config.json
  std::string path;
};
// Reads config.json, the weights and tokenizer.json (optional: only pre-tokenised data works
// without it). A tokenizer with ids beyond the model's vocab_size is refused.
absl::StatusOr<Model> LoadModel(const std::filesystem::path& dir);

// sha256 (hex) of the weights' f32 values in tensor order: the base-model fingerprint clients of
// the llm workload send, equal for every copy of a checkpoint whatever its storage dtype or
// sharding.
std::string WeightsFingerprint(const LlamaWeights& weights);

struct LoraSpec {
  int rank = 16;
  double alpha = 32;  // scaling alpha / rank (alpha / √rank with rsLoRA)
  bool use_rslora = false;
  std::vector<LinearKind> targets = {LinearKind::kQ, LinearKind::kV};
  bool lora_sb = false;  // B·R·A with only R trained; LoRA-SB uses alpha = rank (scaling 1)
};

// A fresh LoRA adapter on every target linear of every layer, initialised as PEFT does: A from
// kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in), and B = 0, so the model starts unchanged.
// Deterministic in `seed`. For LoRA-SB, B, A and R are zero until InitLoraSb sets them.
absl::StatusOr<Adapter> NewAdapter(const LlamaConfig& config, const LoraSpec& spec, uint64_t seed,
                                   const std::string& base_model);

// LoRA-SB's initialisation (Ponkshe et al. 2024, as ../shared/ALGORITHMS.md states it): G, the
// gradient of the mean loss over `examples` with respect to each adapted W0, stands for the first
// optimiser step ΔW = −lr·sign(G); with ΔW ≈ U·S·Vᵀ truncated to rank r, B = U_r, A = V_rᵀ and
// R = diag(S_r), so the model starts at W0 + trunc_r(ΔW) and only R is trained from there.
absl::Status InitLoraSb(const LlamaWeights& weights, const std::vector<Example>& examples,
                        double lr, int batch, int threads, Adapter& adapter);

enum class Schedule { kConstant, kLinear, kCosine };

struct TrainOptions {
  int batch = 4;       // examples per micro-batch
  int grad_accum = 1;  // micro-batches per optimiser step
  int64_t steps = 0;   // optimiser steps; when 0, `epochs` decides
  double epochs = 0;   // passes over the data
  double lr = 2e-4;    // peak learning rate
  double weight_decay = 0.0;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double adam_eps = 1e-8;
  Schedule schedule = Schedule::kLinear;
  double warmup_ratio = 0.0;   // fraction of the steps with a linear warmup from 0
  double max_grad_norm = 1.0;  // clip the global L2 norm of the gradient; 0 turns it off
  uint64_t seed = 0;           // data order
  int threads = 0;             // 0: the machine's cores
  // Keep only each layer's input and recompute its activations in the backward pass: one more
  // forward per step for the memory of one layer's activations instead of all of them.
  bool checkpoint_activations = false;

  // DP-SGD (Abadi et al. 2016, as Opacus computes it; ../shared/ALGORITHMS.md), on when
  // noise_multiplier ≥ 0. Each step draws a Poisson sample (every example independently with
  // probability sample_rate), takes each sampled example's gradient of its mean token loss, clips
  // it to L2 norm clip (flat over all trainable tensors, factor min(1, C/(‖g‖ + 1e-6))), sums, adds
  // N(0, (noise_multiplier·C)²) to every trainable coordinate and divides by the expected batch
  // size sample_rate·n. `batch`, `grad_accum` and `max_grad_norm` do not apply. Noise comes from
  // OpenSSL's RAND_bytes, and so does the sampling; a non-zero test_seed makes both repeatable, for
  // tests only.
  struct DpSgd {
    double noise_multiplier = -1;  // σ; < 0: DP-SGD off
    double clip = 1.0;             // C
    double sample_rate = 0;        // q; 0: batch / number of examples
    uint64_t test_seed = 0;
  } dp;
};

// One step of Fed-SB's federated initialisation on this client's data (common/aggregation/
// sketch.h): for each module of `layout` (its names and shapes; values unused), the product of G,
// the gradient of the mean loss over `examples` with respect to that module's W0, with bases[i] —
// G·basis (range, power; basis in×l), Gᵀ·basis (transposed; out×l), basisᵀ·G (project; out×l)
// or G itself (dense; bases 0×0). Only dense forms G: the others add dyᵀ·(x·basis) and the like
// per batch, O(tokens·(in + out)·l).
// With DP-SGD (dp.noise_multiplier ≥ 0; sample_rate ignored, every example takes part) the answer
// is common/privacy/private_sketch.h's: G is the mean over examples of each one's gradient of its
// mean token loss, each clipped to dp.clip flat over all the modules (its norm from the Gram
// matrices of its rows, ‖dyᵀx‖² = Σ (dy·dyᵀ)∘(x·xᵀ), still without forming G), and the products
// get N(0, (σ·C)²) before the division by the number of examples. Bases that stretch are refused.
absl::StatusOr<std::vector<MatrixD>> SketchGradients(const LlamaWeights& weights,
                                                     const std::vector<Example>& examples,
                                                     const Adapter& layout, SketchStep step,
                                                     const std::vector<MatrixD>& bases, int batch,
                                                     int threads,
                                                     const TrainOptions::DpSgd& dp = {});

struct StepReport {
  int64_t step = 0;  // 1-based
  int64_t steps = 0;
  double loss = 0;       // mean cross-entropy of this step's target tokens
  double lr = 0;         // learning rate used
  double grad_norm = 0;  // before clipping
  int64_t tokens = 0;    // input tokens of this step (padding excluded)
  double seconds = 0;    // since training started
};

struct TrainResult {
  int64_t steps = 0;
  int64_t examples_seen = 0;
  int64_t tokens = 0;  // input tokens processed (padding excluded)
  double first_loss = 0;
  double final_loss = 0;  // mean loss of the last step
  double seconds = 0;
  double dp_sample_rate = 0;   // q used by DP-SGD (0 without it): ε = EpsilonFor(q, σ, steps, δ)
  size_t workspace_bytes = 0;  // the runner's activations and scratch
  double tokens_per_second() const { return seconds > 0 ? tokens / seconds : 0; }
};

// Trains `adapter` in place on `examples`. `on_step` (optional) sees every step.
absl::StatusOr<TrainResult> Train(const LlamaWeights& weights, const std::vector<Example>& examples,
                                  const TrainOptions& options, Adapter& adapter,
                                  const std::function<void(const StepReport&)>& on_step = {});

// Token-weighted mean cross-entropy of `examples` under the model and adapter (null: base model).
absl::StatusOr<LossSum> Evaluate(const LlamaWeights& weights, const Adapter* adapter,
                                 const std::vector<Example>& examples, int batch, int threads);

// The learning-rate multiplier of optimiser step `step` (0-based) of `total`, as Hugging Face's
// get_{constant,linear,cosine}_schedule_with_warmup compute it.
double ScheduleFactor(Schedule schedule, int64_t step, int64_t total, int64_t warmup);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_TRAINER_H_
