#include "client/tool/eval_command.h"

#include <cmath>
#include <cstdio>
#include <nlohmann/json.hpp>

#include "client/tool/commands.h"
#include "client/tool/llm_inputs.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/accuracy.h"

namespace fedlora::tool {
namespace {

// --accuracy: greedy answers to the records with an "answer" field, scored by exact match of the
// extracted answer; prints the accuracy (overall and per task) and adds it to `summary`.
absl::Status MeasureAccuracy(const EvalCommandOptions& o, const common::Model& model,
                             const common::Adapter* lora, nlohmann::json& summary) {
  if (model.tokenizer == nullptr)
    return absl::FailedPreconditionError(o.model + " has no tokenizer.json");
  ASSIGN_OR_RETURN(const std::vector<common::AnswerRecord> records,
                   common::ReadAnswerRecords(o.data, *model.tokenizer));
  ASSIGN_OR_RETURN(const common::AccuracyResult result,
                   common::MeasureAccuracy(model.weights, lora, *model.tokenizer,
                                           model.weights.config().eos_token_ids, records,
                                           {.max_new_tokens = o.max_new_tokens}, 0, o.threads));
  std::printf("accuracy %.4f  (%lld of %zu answers right, greedy, at most %d new tokens)\n",
              result.accuracy(), static_cast<long long>(result.correct), records.size(),
              o.max_new_tokens);
  summary["accuracy"] = result.accuracy();
  const auto by_task = common::AccuracyByTask(records, result);
  for (const auto& [task, accuracy] : by_task) std::printf("  %s %.4f\n", task.c_str(), accuracy);
  if (!by_task.empty()) summary["accuracy_by_task"] = by_task;
  summary["correct"] = result.correct;
  summary["answered"] = records.size();
  if (o.responses.empty()) return absl::OkStatus();
  std::string lines;
  for (size_t i = 0; i < records.size(); ++i)
    lines += nlohmann::json({{"answer", records[i].answer},
                             {"response", result.responses[i]},
                             {"correct", static_cast<bool>(result.is_correct[i])}})
                 .dump() +
             "\n";
  return common::WriteFileAtomically(o.responses, lines);
}

}  // namespace

absl::Status Run(const EvalCommandOptions& o) {
  ASSIGN_OR_RETURN(const common::Model model, common::LoadModel(o.model));
  ASSIGN_OR_RETURN(const std::optional<common::Adapter> adapter, ReadAdapterIfNamed(o.adapter));
  const common::Adapter* lora = adapter ? &*adapter : nullptr;
  const int max_length =
      o.max_length > 0 ? o.max_length : model.weights.config().max_position_embeddings;
  ASSIGN_OR_RETURN(const std::vector<common::Example> examples,
                   ReadModelData(model, o.data, max_length));
  ASSIGN_OR_RETURN(const common::LossSum loss,
                   common::Evaluate(model.weights, lora, examples, o.batch, o.threads));
  if (loss.tokens == 0)
    return absl::InvalidArgumentError(common::StrCat(o.data, " has no target tokens"));
  const double mean = loss.sum / static_cast<double>(loss.tokens);
  std::printf("loss %.6f  perplexity %.4f  over %lld target tokens in %zu records\n", mean,
              std::exp(mean), static_cast<long long>(loss.tokens), examples.size());
  nlohmann::json summary = {{"loss", mean},
                            {"perplexity", std::exp(mean)},
                            {"tokens", loss.tokens},
                            {"records", examples.size()}};
  if (o.accuracy) RETURN_IF_ERROR(MeasureAccuracy(o, model, lora, summary));
  if (o.json) PrintJsonLine(summary);
  return absl::OkStatus();
}

void AddEvalCommand(CLI::App& app) {
  auto o = std::make_shared<EvalCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "eval", "Mean cross-entropy of a JSONL file's target tokens under a model and adapter");
  cmd->add_option("--model", o->model, "Hugging Face model directory")->required();
  cmd->add_option("--adapter", o->adapter, "PEFT adapter directory (default: the base model)");
  cmd->add_option("--data", o->data, "JSONL file (instruction, text or input_ids records)")
      ->required();
  cmd->add_option("--max-length", o->max_length,
                  "truncate records to this many tokens (default: the model's "
                  "max_position_embeddings)")
      ->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--batch", o->batch, "records per forward pass")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--threads", o->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--accuracy", o->accuracy,
                "also generate a response to every record with an \"answer\" field (greedy) "
                "and score it by exact match of the extracted answer (LLM-Adapters)");
  cmd->add_option("--max-new-tokens", o->max_new_tokens, "--accuracy: tokens per response")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--responses", o->responses,
                  "--accuracy: write each record's answer, response and verdict here (JSONL)");
  cmd->add_flag("--json", o->json,
                "end with a JSON line: loss, perplexity, tokens, records (and accuracy, "
                "correct, answered)");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
