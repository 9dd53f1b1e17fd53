// The `llm` workload: the built-in trainer (common/trainer.h) fine-tunes the site's copy of a
// Llama-family model on the site's JSONL data. The node offers every linear of every decoder layer
// (the coordinator's target_modules picks which are adapted), trains A and B — or only R for
// fed-sb — for the task's local steps with AdamW at its learning rate and seed, and reports the
// mean loss of up to `eval_examples` of its records before and after.
//
// The fingerprint is the sha256 of the weights as f32 in the checkpoint's tensor order, so sites
// holding the same checkpoint agree whatever its storage dtype or sharding.
#ifndef FEDLORA_CLIENT_WORKLOADS_LLM_WORKLOAD_H_
#define FEDLORA_CLIENT_WORKLOADS_LLM_WORKLOAD_H_

#include <memory>
#include <string>
#include <vector>

#include "client/privacy_ledger.h"
#include "client/workloads/workload.h"
#include "common/llm/trainer.h"

namespace fedlora::client {

struct LlmOptions {
  std::string model_dir;                // Hugging Face model directory
  std::string data;                     // the site's JSONL
  int max_length = 256;                 // tokens per record (longer records are truncated)
  int batch = 4;                        // records per micro-batch
  int grad_accum = 1;                   // micro-batches per optimiser step
  int eval_examples = 64;               // records whose loss is reported before and after training
  int threads = 0;                      // 0: all cores
  bool checkpoint_activations = false;  // recompute each layer's activations in the backward
  // DP-SGD (common/trainer.h), with the client's own ledger (privacy_ledger.h).
  DpSgdSettings privacy;
};

class LlmWorkload final : public Workload {
 public:
  static absl::StatusOr<std::unique_ptr<LlmWorkload>> Create(const LlmOptions& options);

  std::string fingerprint() const override { return fingerprint_; }
  int64_t num_examples() const override { return static_cast<int64_t>(examples_.size()); }
  std::vector<v1::ModuleSpec> modules() const override;
  // With DP-SGD, RESOURCE_EXHAUSTED when the round would spend more than target_epsilon (the
  // node then declines it and leaves the run).
  absl::StatusOr<v1::TrainMetrics> Train(const v1::Task& task, common::Adapter& adapter) override;
  // The gradient over the first task.sketch().examples() records, batch by batch
  // (common::SketchGradients). With DP-SGD, record by record, clipped and noised, and counted in
  // the privacy ledger as one step at q = 1 (RESOURCE_EXHAUSTED past target_epsilon).
  absl::StatusOr<std::vector<common::MatrixD>> Sketch(
      const v1::Task& task, common::SketchStep step,
      const std::vector<common::MatrixD>& bases) override;
  absl::Status MergeIntoBase(const common::Adapter& delta) override;
  // <dir>/model, written atomically: the model with every merged FLoRA delta folded in
  // (config.json, model.safetensors and the tokenizer).
  absl::Status WriteFinalState(const std::filesystem::path& dir) const override;

 private:
  LlmWorkload(LlmOptions options, common::Model model)
      : options_(std::move(options)), model_(std::move(model)) {}

  LlmOptions options_;
  common::Model model_;
  std::vector<common::Example> examples_;
  std::string fingerprint_;
};

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_WORKLOADS_LLM_WORKLOAD_H_
