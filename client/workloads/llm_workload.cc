#include "client/workloads/llm_workload.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <optional>

#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::client {

absl::StatusOr<std::unique_ptr<LlmWorkload>> LlmWorkload::Create(const LlmOptions& options) {
  ASSIGN_OR_RETURN(common::Model model, common::LoadModel(options.model_dir));
  std::unique_ptr<LlmWorkload> w(new LlmWorkload(options, std::move(model)));
  ASSIGN_OR_RETURN(w->examples_,
                   common::ReadExamples(options.data, w->model_.tokens, options.max_length));
  w->fingerprint_ = common::WeightsFingerprint(w->model_.weights);
  spdlog::info("llm workload: {} ({} parameters), {} records from {}, fingerprint {}",
               options.model_dir, w->model_.weights.num_parameters(), w->examples_.size(),
               options.data, w->fingerprint_.substr(0, 12));
  return w;
}

std::vector<v1::ModuleSpec> LlmWorkload::modules() const {
  const common::LlamaConfig& c = model_.weights.config();
  std::vector<v1::ModuleSpec> out;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int k = 0; k < common::kNumLinearKinds; ++k) {
      const auto kind = static_cast<common::LinearKind>(k);
      v1::ModuleSpec m;
      m.set_name(common::LinearPath(l, kind));
      m.set_in_features(common::LinearIn(c, kind));
      m.set_out_features(common::LinearOut(c, kind));
      out.push_back(m);
    }
  return out;
}

absl::StatusOr<v1::TrainMetrics> LlmWorkload::Train(const v1::Task& task,
                                                    common::Adapter& adapter) {
  const auto start = std::chrono::steady_clock::now();
  const std::vector<common::Example> probe(
      examples_.begin(),
      examples_.begin() + std::min<size_t>(examples_.size(), options_.eval_examples));
  auto mean = [&]() -> absl::StatusOr<double> {
    ASSIGN_OR_RETURN(common::LossSum l, common::Evaluate(model_.weights, &adapter, probe,
                                                         options_.batch, options_.threads));
    return l.tokens > 0 ? l.sum / static_cast<double>(l.tokens) : 0.0;
  };
  v1::TrainMetrics metrics;
  ASSIGN_OR_RETURN(double before, mean());
  common::TrainOptions o;
  o.batch = options_.batch;
  o.grad_accum = options_.grad_accum;
  o.steps = std::max<int64_t>(1, task.settings().local_steps());
  o.lr = task.settings().learning_rate();
  o.schedule = common::Schedule::kConstant;  // each round continues one run; no per-round decay
  o.seed = task.settings().seed();
  o.threads = options_.threads;
  o.checkpoint_activations = options_.checkpoint_activations;
  // DP-SGD: the client's ledger says whether its budget allows this round.
  std::optional<PrivacyLedger> ledger;
  if (options_.privacy.enabled()) {
    o.dp = options_.privacy.dp;
    if (o.dp.sample_rate <= 0)
      o.dp.sample_rate = std::min(1.0, static_cast<double>(o.batch) / examples_.size());
    ASSIGN_OR_RETURN(ledger, PrivacyLedger::Load(options_.privacy));
    RETURN_IF_ERROR(ledger->Admit(task.round(), o.dp.sample_rate, o.steps));
  }
  ASSIGN_OR_RETURN(common::TrainResult result,
                   common::Train(model_.weights, examples_, o, adapter));
  if (ledger) {
    RETURN_IF_ERROR(ledger->Record(task.round(), o.dp.sample_rate, result.steps, metrics));
  }
  ASSIGN_OR_RETURN(double after, mean());
  metrics.set_loss_before(before);
  metrics.set_loss_after(after);
  metrics.set_steps(result.steps);
  metrics.set_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  spdlog::info("round {}: {} steps, {:.0f} tokens/s, loss on {} local records {:.4f} -> {:.4f}",
               task.round(), result.steps, result.tokens_per_second(), probe.size(), before, after);
  return metrics;
}

absl::StatusOr<std::vector<common::MatrixD>> LlmWorkload::Sketch(
    const v1::Task& task, common::SketchStep step, const std::vector<common::MatrixD>& bases) {
  std::vector<common::ModuleShape> shapes;
  for (const v1::ModuleSpec& m : task.modules())
    shapes.push_back({m.name(), 1, m.in_features(), m.out_features(), 1.0, true});
  ASSIGN_OR_RETURN(common::Adapter layout, common::Adapter::Create(shapes));
  const std::vector<common::Example> data(
      examples_.begin(),
      examples_.begin() +
          std::min<size_t>(examples_.size(), std::max(1, task.sketch().examples())));
  if (!options_.privacy.enabled()) {
    return common::SketchGradients(model_.weights, data, layout, step, bases, options_.batch,
                                   options_.threads);
  }
  // DP-SGD: one Gaussian mechanism over all the records (q = 1), one step in the client's ledger.
  ASSIGN_OR_RETURN(PrivacyLedger ledger, PrivacyLedger::Load(options_.privacy));
  RETURN_IF_ERROR(ledger.AdmitInitStep(task.round()));
  common::TrainOptions::DpSgd dp = options_.privacy.dp;
  dp.noise_multiplier = options_.privacy.init_sigma();
  ASSIGN_OR_RETURN(std::vector<common::MatrixD> products,
                   common::SketchGradients(model_.weights, data, layout, step, bases,
                                           options_.batch, options_.threads, dp));
  RETURN_IF_ERROR(ledger.RecordInitStep(task.round()));
  return products;
}

absl::Status LlmWorkload::MergeIntoBase(const common::Adapter& delta) {
  return model_.weights.Merge(delta, common::DType::kF32);  // exact over the rounds
}

absl::Status LlmWorkload::WriteFinalState(const std::filesystem::path& dir) const {
  return model_.weights.WriteModelDirectory(dir / "model", options_.model_dir,
                                            /*dtype=*/std::nullopt, /*overwrite=*/true);
}

}  // namespace fedlora::client
