#include "client/tool/train_command.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>

#include "client/tool/commands.h"
#include "client/tool/llm_inputs.h"
#include "common/base/proc_stats.h"
#include "common/base/status_macros.h"
#include "common/privacy/privacy_accountant.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {
namespace {

absl::StatusOr<common::LoraSpec> LoraSpecOf(const TrainCommandOptions& o) {
  common::LoraSpec spec{o.rank, o.alpha, o.rslora, {}, o.method == "lora-sb"};
  if (spec.alpha < 0) spec.alpha = spec.lora_sb ? o.rank : 2.0 * o.rank;
  ASSIGN_OR_RETURN(spec.targets, common::ParseLinearKinds(o.targets));
  return spec;
}

// The trainer's options: the schedule by name, and with a target epsilon the smallest DP-SGD
// noise multiplier that meets it over the steps.
absl::StatusOr<common::TrainOptions> TrainerOptions(const TrainCommandOptions& o,
                                                    size_t num_examples) {
  common::TrainOptions t = o.train;
  t.schedule = o.schedule == "cosine"     ? common::Schedule::kCosine
               : o.schedule == "constant" ? common::Schedule::kConstant
                                          : common::Schedule::kLinear;
  if (o.target_epsilon <= 0) return t;
  const double q = t.dp.sample_rate > 0
                       ? t.dp.sample_rate
                       : std::min(1.0, static_cast<double>(t.batch) / num_examples);
  if (t.steps <= 0)
    return absl::InvalidArgumentError("--target-epsilon needs --steps (the budget counts them)");
  ASSIGN_OR_RETURN(
      t.dp.noise_multiplier,
      common::NoiseMultiplierFor(o.target_epsilon, q, static_cast<double>(t.steps), o.dp_delta));
  spdlog::info(
      "DP-SGD: noise multiplier {:.4f} spends epsilon {} at delta {} over {} steps, q {:.4g}",
      t.dp.noise_multiplier, o.target_epsilon, o.dp_delta, t.steps, q);
  return t;
}

// DP-SGD's spending over the run: printed, and added to `summary`.
absl::Status ReportPrivacy(const TrainCommandOptions& o, const common::TrainOptions& t,
                           const common::TrainResult& result, nlohmann::json& summary) {
  ASSIGN_OR_RETURN(const common::PrivacySpent spent,
                   common::EpsilonFor(result.dp_sample_rate, t.dp.noise_multiplier,
                                      static_cast<double>(result.steps), o.dp_delta));
  summary["epsilon"] = spent.epsilon;
  summary["delta"] = o.dp_delta;
  summary["noise_multiplier"] = t.dp.noise_multiplier;
  summary["sample_rate"] = result.dp_sample_rate;
  std::printf(
      "DP-SGD: epsilon %.4f at delta %g (noise multiplier %.4f, clip %g, sample rate %.4g, "
      "%lld steps; best RDP order %g)\n",
      spent.epsilon, o.dp_delta, t.dp.noise_multiplier, t.dp.clip, result.dp_sample_rate,
      static_cast<long long>(result.steps), spent.order);
  return absl::OkStatus();
}

}  // namespace

absl::Status Run(const TrainCommandOptions& o) {
  if (o.train.steps <= 0 && !(o.train.epochs > 0))
    return absl::InvalidArgumentError("give --steps N or --epochs E");
  ASSIGN_OR_RETURN(const common::Model model, common::LoadModel(o.model));
  ASSIGN_OR_RETURN(const std::vector<common::Example> examples,
                   ReadModelData(model, o.data, o.seq));
  ASSIGN_OR_RETURN(const common::LoraSpec spec, LoraSpecOf(o));
  ASSIGN_OR_RETURN(const common::TrainOptions t, TrainerOptions(o, examples.size()));
  ASSIGN_OR_RETURN(common::Adapter adapter,
                   common::NewAdapter(model.weights.config(), spec, t.seed, o.model));
  if (spec.lora_sb) {
    const size_t n = std::min(examples.size(), static_cast<size_t>(std::max(1, o.init_examples)));
    const std::vector<common::Example> init(examples.begin(), examples.begin() + n);
    spdlog::info("LoRA-SB: initialising B, A, R from the gradient on {} examples", n);
    RETURN_IF_ERROR(common::InitLoraSb(model.weights, init, t.lr, t.batch, t.threads, adapter));
  }
  std::optional<std::vector<common::Example>> held_out;
  if (!o.eval_data.empty()) {
    ASSIGN_OR_RETURN(held_out, ReadModelData(model, o.eval_data, o.seq));
  }
  auto evaluate = [&]() -> absl::StatusOr<double> {
    ASSIGN_OR_RETURN(const common::LossSum l,
                     common::Evaluate(model.weights, &adapter, *held_out, t.batch, t.threads));
    return l.tokens ? l.sum / static_cast<double>(l.tokens) : 0.0;
  };
  std::optional<double> eval_before;
  if (held_out) {
    ASSIGN_OR_RETURN(eval_before, evaluate());
    spdlog::info("held-out loss before training {:.6f}", *eval_before);
  }
  spdlog::info("training {} on {} examples: {} modules, {} trainable parameters", o.method,
               examples.size(), adapter.num_modules(),
               spec.lora_sb ? adapter.num_modules() * static_cast<size_t>(o.rank) * o.rank
                            : adapter.values().size());
  int64_t tokens = 0;
  ASSIGN_OR_RETURN(
      const common::TrainResult result,
      common::Train(model.weights, examples, t, adapter, [&tokens](const common::StepReport& r) {
        tokens += r.tokens;
        if (r.step == 1 || r.step == r.steps || r.step % 10 == 0)
          spdlog::info("step {}/{}  loss {:.6f}  lr {:.3g}  grad norm {:.4g}  {:.0f} tokens/s",
                       r.step, r.steps, r.loss, r.lr, r.grad_norm,
                       r.seconds > 0 ? static_cast<double>(tokens) / r.seconds : 0.0);
      }));
  RETURN_IF_ERROR(common::WritePeftAdapter(adapter, o.out, {.overwrite = o.overwrite}));
  nlohmann::json summary = {{"final_loss", result.final_loss},
                            {"first_loss", result.first_loss},
                            {"steps", result.steps},
                            {"tokens", result.tokens},
                            {"seconds", result.seconds},
                            {"tokens_per_second", result.tokens_per_second()},
                            // the resident set's peak: the checkpoint's pages and the workspace
                            {"peak_rss_bytes", common::StatusBytes("VmHWM:")},
                            {"workspace_bytes", result.workspace_bytes},
                            {"adapter", o.out}};
  if (t.dp.noise_multiplier >= 0) RETURN_IF_ERROR(ReportPrivacy(o, t, result, summary));
  std::printf("trained %lld steps in %.2f s (%.1f tokens/s): loss %.6f -> %.6f; adapter in %s\n",
              static_cast<long long>(result.steps), result.seconds, result.tokens_per_second(),
              result.first_loss, result.final_loss, o.out.c_str());
  if (held_out) {
    ASSIGN_OR_RETURN(const double after, evaluate());
    summary["eval_loss_before"] = *eval_before;
    summary["eval_loss"] = after;
    std::printf("held-out loss %.6f -> %.6f\n", *eval_before, after);
  }
  if (o.json) PrintJsonLine(summary);
  return absl::OkStatus();
}

void AddTrainCommand(CLI::App& app) {
  auto o = std::make_shared<TrainCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "train", "Fine-tune a LoRA or LoRA-SB adapter centrally and write it as a PEFT directory");
  cmd->add_option("--model", o->model, "Hugging Face model directory")->required();
  cmd->add_option("--data", o->data, "training JSONL")->required();
  cmd->add_option("--out", o->out, "PEFT adapter directory to write")->required();
  cmd->add_flag("--overwrite", o->overwrite, "replace --out if it exists");
  cmd->add_option("--eval-data", o->eval_data, "held-out JSONL, evaluated before and after");
  cmd->add_option("--method", o->method, "lora, or lora-sb (only R trained)")
      ->capture_default_str()
      ->check(CLI::IsMember({"lora", "lora-sb"}));
  cmd->add_option("--rank", o->rank, "LoRA rank r")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--alpha", o->alpha, "lora_alpha (default 2·r; r for lora-sb)");
  cmd->add_flag("--rslora", o->rslora, "scale by alpha/√r instead of alpha/r");
  cmd->add_option("--targets", o->targets, "comma-separated modules (q_proj ... down_proj)")
      ->delimiter(',')
      ->allow_extra_args(false)
      ->capture_default_str();
  cmd->add_option("--batch", o->train.batch, "records per micro-batch")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seq", o->seq, "maximum tokens per record (longer ones are truncated)")
      ->capture_default_str()
      ->check(CLI::Range(2, 1 << 20));
  auto* steps = cmd->add_option("--steps", o->train.steps, "optimiser steps");
  auto* epochs = cmd->add_option("--epochs", o->train.epochs, "passes over the data");
  steps->excludes(epochs);
  cmd->add_option("--lr", o->train.lr, "peak learning rate")->capture_default_str();
  cmd->add_flag("--checkpoint-activations", o->train.checkpoint_activations,
                "keep only each layer's input and recompute its activations in the backward "
                "(less memory for long sequences, one more forward per step)");
  cmd->add_option("--grad-accum", o->train.grad_accum, "micro-batches per step")
      ->capture_default_str();
  cmd->add_option("--weight-decay", o->train.weight_decay, "AdamW weight decay")
      ->capture_default_str();
  cmd->add_option("--schedule", o->schedule, "linear, cosine or constant (after warmup)")
      ->capture_default_str()
      ->check(CLI::IsMember({"linear", "cosine", "constant"}));
  cmd->add_option("--warmup-ratio", o->train.warmup_ratio, "fraction of steps warming up")
      ->capture_default_str();
  cmd->add_option("--max-grad-norm", o->train.max_grad_norm, "gradient clipping (0: off)")
      ->capture_default_str();
  cmd->add_option("--init-examples", o->init_examples,
                  "lora-sb: records whose gradient initialises B, A and R")
      ->capture_default_str();
  cmd->add_option("--seed", o->train.seed, "data order and LoRA A initialisation")
      ->capture_default_str();
  cmd->add_option("--threads", o->train.threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_option("--dp-noise-multiplier", o->train.dp.noise_multiplier,
                  "DP-SGD: noise stddev / clip (per-example clipping, Poisson sampling)");
  cmd->add_option("--dp-clip", o->train.dp.clip, "DP-SGD: per-example L2 clip norm")
      ->capture_default_str();
  cmd->add_option("--dp-sample-rate", o->train.dp.sample_rate,
                  "DP-SGD: Poisson sampling rate (default batch / records)");
  cmd->add_option("--dp-delta", o->dp_delta, "DP-SGD: delta of the reported epsilon")
      ->capture_default_str();
  cmd->add_option("--target-epsilon", o->target_epsilon,
                  "DP-SGD: choose the noise multiplier that spends this epsilon over --steps");
  cmd->add_flag("--json", o->json,
                "end with a JSON line: tokens_per_second, final_loss, steps, tokens, seconds, "
                "peak_rss_bytes, workspace_bytes (and epsilon with DP-SGD)");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
