#include "server/evaluator.h"

#include <spdlog/spdlog.h>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/blob.h"

namespace fedlora::server {

using common::StrCat;

absl::StatusOr<std::unique_ptr<Evaluator>> Evaluator::Load(const ServerOptions& options) {
  std::unique_ptr<Evaluator> e(new Evaluator);
  ASSIGN_OR_RETURN(common::Model model, common::LoadModel(options.base_model_dir));
  e->base_ = std::make_unique<common::Model>(std::move(model));
  e->fingerprint_ = common::WeightsFingerprint(e->base_->weights);
  if (!options.base_model_sha256.empty() && options.base_model_sha256 != e->fingerprint_) {
    return absl::InvalidArgumentError(
        StrCat("base_model_dir ", options.base_model_dir, " has fingerprint ", e->fingerprint_,
               " but base_model_sha256 is ", options.base_model_sha256));
  }
  spdlog::info("base model {}: {} parameters, fingerprint {}", options.base_model_dir,
               e->base_->weights.num_parameters(), e->fingerprint_);
  if (!options.eval_data.empty()) {
    ASSIGN_OR_RETURN(e->eval_examples_, common::ReadExamples(options.eval_data, e->base_->tokens,
                                                             options.eval_max_length));
    size_t without_targets = 0;
    for (const common::Example& ex : e->eval_examples_)
      without_targets += common::TargetCount(ex) == 0;
    if (without_targets == e->eval_examples_.size())
      return absl::InvalidArgumentError(
          StrCat("eval_data ", options.eval_data, ": no record keeps a target token within ",
                 options.eval_max_length, " tokens; raise eval_max_length"));
    if (without_targets > 0)
      spdlog::warn(
          "{} of {} records of {} have no target tokens within {} tokens (a larger "
          "eval_max_length keeps their responses)",
          without_targets, e->eval_examples_.size(), options.eval_data, options.eval_max_length);
  }
  if (options.eval_accuracy) {
    if (e->base_->tokenizer == nullptr)
      return absl::FailedPreconditionError(StrCat(
          "eval_accuracy needs the base model's tokenizer.json in ", options.base_model_dir));
    ASSIGN_OR_RETURN(e->answer_records_,
                     common::ReadAnswerRecords(options.eval_data, *e->base_->tokenizer));
    e->max_new_tokens_ = options.eval_max_new_tokens;
  }
  e->flora_ = options.method == common::Method::kFlora;
  if (e->flora_) e->flora_merged_ = e->base_->weights;
  return e;
}

absl::Status Evaluator::MergeFloraUpTo(const Ledger& ledger, const StateStore& store,
                                       int64_t version) {
  if (!flora_) return absl::OkStatus();
  for (; flora_version_ < version; ++flora_version_) {
    const BlobRef& delta_blob = ledger.at(flora_version_ + 1).blobs.at(0);
    ASSIGN_OR_RETURN(std::string bytes, store.ReadWholeBlob(delta_blob.sha256));
    ASSIGN_OR_RETURN(
        common::Adapter delta,
        common::DecodeAdapter(bytes, StrCat("FLoRA delta of version ", flora_version_ + 1)));
    RETURN_IF_ERROR(flora_merged_->Merge(delta, common::DType::kF32));  // rounded once per export
  }
  return absl::OkStatus();
}

absl::StatusOr<std::optional<Evaluator::Scores>> Evaluator::Evaluate(
    const Ledger& ledger, const StateStore& store, int64_t version, const common::Adapter& global) {
  if (eval_examples_.empty()) return std::nullopt;
  if (flora_) {
    if (flora_version_ > version) return std::nullopt;
    RETURN_IF_ERROR(MergeFloraUpTo(ledger, store, version));
  }
  // The global model: the base with the adapter (LoRA-SB's frozen B, A carry the averaged R), or
  // for FLoRA the base with every round's delta merged.
  const common::LlamaWeights& weights = flora_ ? *flora_merged_ : base_->weights;
  const common::Adapter* adapter = flora_ ? nullptr : &global;
  ASSIGN_OR_RETURN(common::LossSum l, common::Evaluate(weights, adapter, eval_examples_,
                                                       /*batch=*/8, /*threads=*/0));
  Scores scores{l.tokens > 0 ? l.sum / static_cast<double>(l.tokens) : 0.0, std::nullopt};
  if (!answer_records_.empty()) {
    ASSIGN_OR_RETURN(
        common::AccuracyResult a,
        common::MeasureAccuracy(weights, adapter, *base_->tokenizer, weights.config().eos_token_ids,
                                answer_records_, {.max_new_tokens = max_new_tokens_}));
    scores.accuracy = a.accuracy();
    scores.accuracy_by_task = common::AccuracyByTask(answer_records_, a);
  }
  return scores;
}

absl::StatusOr<common::LlamaWeights> Evaluator::Merged(const Ledger& ledger,
                                                       const StateStore& store, int64_t version,
                                                       const common::Adapter& global) {
  if (flora_) {
    RETURN_IF_ERROR(MergeFloraUpTo(ledger, store, version));
    if (flora_version_ != version) {
      return absl::FailedPreconditionError(
          StrCat("the merged FLoRA weights are at version ", flora_version_, ", not ", version));
    }
    return *flora_merged_;
  }
  common::LlamaWeights merged = base_->weights;
  RETURN_IF_ERROR(merged.Merge(global));
  return merged;
}

}  // namespace fedlora::server
