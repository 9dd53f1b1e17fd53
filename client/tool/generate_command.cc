#include "client/tool/generate_command.h"

#include <Eigen/Core>
#include <algorithm>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <numeric>
#include <random>

#include "client/tool/commands.h"
#include "client/tool/llm_inputs.h"
#include "common/base/status_macros.h"
#include "common/llm/dataset.h"
#include "common/llm/trainer.h"

namespace fedlora::tool {
namespace {

// The K most probable next tokens and their probabilities (softmax in double, as llama.cpp
// reports them).
nlohmann::json TopProbabilities(std::span<const float> logits, int k) {
  const Eigen::Map<const Eigen::ArrayXf> l(logits.data(), static_cast<Eigen::Index>(logits.size()));
  Eigen::ArrayXd probs = (l.cast<double>() - l.maxCoeff()).exp();
  probs /= probs.sum();
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const auto top = order.begin() + std::min<std::ptrdiff_t>(k, std::ssize(order));
  std::partial_sort(order.begin(), top, order.end(),
                    [&](int32_t x, int32_t y) { return probs(x) > probs(y); });
  nlohmann::json out = nlohmann::json::array();
  for (auto it = order.begin(); it != top; ++it) out.push_back({{"id", *it}, {"p", probs(*it)}});
  return out;
}

// The texts to continue: the prompts, then a prompt per record of `data` (an instruction record's
// template up to "### Response:\n", a text record's text).
absl::StatusOr<std::vector<std::string>> PromptTexts(const GenerateCommandOptions& o) {
  std::vector<std::string> texts = o.prompts;
  if (!o.data.empty())
    RETURN_IF_ERROR(common::ForEachJsonRecord(
        o.data, [&](const nlohmann::json& r, const std::string& where) -> absl::Status {
          auto field = [&](const char* key) {
            return r.is_object() && r.contains(key) && r[key].is_string()
                       ? r[key].get<std::string>()
                       : std::string();
          };
          if (r.is_object() && r.contains("instruction"))
            texts.push_back(common::InstructionPrompt(field("instruction"), field("input")));
          else if (r.is_object() && r.contains("text"))
            texts.push_back(field("text"));
          else
            return absl::InvalidArgumentError(
                where + ": expected an instruction or a text record to take a prompt from");
          return absl::OkStatus();
        }));
  if (texts.empty()) return absl::InvalidArgumentError(o.data + " has no records");
  return texts;
}

// With top_probs: one prompt at a time, looking at every step's logits (`tops`, per prompt).
absl::StatusOr<std::vector<std::vector<int32_t>>> GenerateWithTops(
    const GenerateCommandOptions& o, const common::Model& model, const common::Adapter* lora,
    const std::vector<std::vector<int32_t>>& prompts, std::vector<nlohmann::json>& tops) {
  ASSIGN_OR_RETURN(std::unique_ptr<common::Decoder> decoder,
                   common::Decoder::Create(&model.weights, lora,
                                           model.weights.config().max_position_embeddings));
  std::vector<std::vector<int32_t>> generated;
  for (size_t p = 0; p < prompts.size(); ++p) {
    std::mt19937_64 rng(o.seed + p);
    tops[p] = nlohmann::json::array();
    ASSIGN_OR_RETURN(std::vector<int32_t> ids,
                     common::Generate(*decoder, prompts[p], model.weights.config().eos_token_ids,
                                      o.sampling, rng, [&](std::span<const float> logits) {
                                        tops[p].push_back(TopProbabilities(logits, o.top_probs));
                                      }));
    generated.push_back(std::move(ids));
  }
  return generated;
}

}  // namespace

// A prompt is encoded as a text record is: the tokenizer's prefix, then the text.
absl::Status Run(const GenerateCommandOptions& o) {
  if (o.prompts.empty() && o.data.empty())
    return absl::InvalidArgumentError("give --prompt TEXT or --data FILE");
  ASSIGN_OR_RETURN(const common::Model model, common::LoadModel(o.model));
  if (model.tokenizer == nullptr)
    return absl::FailedPreconditionError(o.model + " has no tokenizer.json to encode prompts");
  ASSIGN_OR_RETURN(const std::optional<common::Adapter> adapter, ReadAdapterIfNamed(o.adapter));
  ASSIGN_OR_RETURN(const std::vector<std::string> texts, PromptTexts(o));
  std::vector<std::vector<int32_t>> prompts;
  for (const std::string& text : texts) {
    std::vector<int32_t> ids = model.tokenizer->prefix();
    for (int32_t id : model.tokenizer->Encode(text)) ids.push_back(id);
    prompts.push_back(std::move(ids));
  }
  const common::Adapter* lora = adapter ? &*adapter : nullptr;
  std::vector<std::vector<int32_t>> generated;
  std::vector<nlohmann::json> tops(prompts.size());
  if (o.top_probs > 0) {
    ASSIGN_OR_RETURN(generated, GenerateWithTops(o, model, lora, prompts, tops));
  } else {
    ASSIGN_OR_RETURN(generated, common::GenerateAll(model.weights, lora, prompts,
                                                    model.weights.config().eos_token_ids,
                                                    o.sampling, o.seed, o.threads));
  }
  for (size_t p = 0; p < prompts.size(); ++p) {
    const std::string text = model.tokenizer->Decode(generated[p], true);
    if (o.json) {
      nlohmann::json out = {
          {"prompt", texts[p]}, {"prompt_ids", prompts[p]}, {"ids", generated[p]}, {"text", text}};
      if (o.top_probs > 0) out["top"] = tops[p];
      PrintJsonLine(out);
    } else {
      std::printf("%s%s\n", texts[p].c_str(), text.c_str());
    }
  }
  return absl::OkStatus();
}

void AddGenerateCommand(CLI::App& app) {
  auto o = std::make_shared<GenerateCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "generate", "Continue prompts under a model and adapter (greedy or sampled, KV cache)");
  cmd->add_option("--model", o->model, "Hugging Face model directory")->required();
  cmd->add_option("--adapter", o->adapter, "PEFT adapter directory (default: the base model)");
  auto* prompt = cmd->add_option("--prompt", o->prompts, "a text to continue (repeatable)");
  auto* data = cmd->add_option(
      "--data", o->data, "JSONL: answer each instruction record's prompt (or continue a text)");
  prompt->excludes(data);
  cmd->add_option("--max-new-tokens", o->sampling.max_new_tokens, "tokens to generate at most")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--temperature", o->sampling.temperature, "0: greedy; else sample logits/T")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--top-p", o->sampling.top_p, "sample from the smallest set of this mass")
      ->capture_default_str()
      ->check(CLI::Range(1e-9, 1.0));
  cmd->add_option("--seed", o->seed, "sampling seed (prompt i uses seed + i)")
      ->capture_default_str();
  cmd->add_option("--top-probs", o->top_probs,
                  "with --json: the K most probable next tokens of each step, with probabilities")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--threads", o->threads, "threads (0: all cores)")->capture_default_str();
  cmd->add_flag("--json", o->json,
                "one JSON line per prompt: prompt, prompt_ids, ids, text (and top)");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
