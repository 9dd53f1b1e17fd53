// Training and evaluation data from JSONL, one record per line, in one of three forms:
// clang-format off
//   {"instruction", "input" (optional), "output"}  — the prompt template below; loss on the response
//   {"text"}                                        — loss on every token
//   {"input_ids" [, "labels"]}                      — pre-tokenised; labels default to input_ids and
//                                                     -100 marks positions without loss, as in Hugging Face
// clang-format on
// Labels follow Hugging Face's causal-LM convention: position t is trained to predict labels[t+1].
//
// The prompt template is Alpaca's, which the LLM-Adapters commonsense data (the Fed-SB and LoRA-SB
// papers' benchmark) is trained with:
//   "Below is an instruction that describes a task[, paired with an input that provides further
//   context]. Write a response that appropriately completes the request.\n\n### Instruction:\n
//   {instruction}\n\n[### Input:\n{input}\n\n]### Response:\n" then {output} and EOS.
// A text record is tokenised exactly as the Hugging Face tokenizer does it by default: with the
// special tokens its post-processor puts around a text (Llama's BOS, for one). An instruction
// record is tokenised as LLM-Adapters does it: prompt and response as one text (so a tokenizer that
// prepends "▁" to a text does so once), the first len(tokens(prompt)) tokens without loss, framed
// by the post-processor's leading special tokens and ended with the model's first eos_token_id
// when config.json has one. Pre-tokenised records are taken as they are. Records longer than the
// maximum length are truncated at the end.
#ifndef FEDLORA_COMMON_LLM_DATASET_H_
#define FEDLORA_COMMON_LLM_DATASET_H_

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/llm/llama.h"
#include "common/llm/tokenizer.h"

namespace fedlora::common {

struct Example {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;  // same length; -100 = no loss
};

struct Tokens {
  const Tokenizer* tokenizer = nullptr;  // needed for text and instruction records
  int32_t eos = -1;                      // ends instruction records when ≥ 0
  int32_t vocab_size = 0;                // ids of pre-tokenised records must be below it
};

// Positions of `example` that carry a loss term (labels[t] for t ≥ 1 that are not -100), as
// TokenBatch::TargetCount counts them.
int64_t TargetCount(const Example& example);

// record[key] as a string: "" when absent or null; an error naming `where` when not a string.
absl::StatusOr<std::string> StringField(const nlohmann::json& record, const char* key,
                                        const std::string& where);

// The prompt of an instruction record (the template above, without the response).
std::string InstructionPrompt(const std::string& instruction, const std::string& input);

// One record; `where` ("file:line") prefixes errors.
absl::StatusOr<Example> ParseExample(const nlohmann::json& record, const Tokens& tokens,
                                     int max_length, const std::string& where);

// Calls fn(record, "file:line") for every line of a JSONL file but blank ones, stopping at the
// first error (a line that is not JSON, or fn's).
absl::Status ForEachJsonRecord(
    const std::filesystem::path& path,
    const std::function<absl::Status(const nlohmann::json&, const std::string&)>& fn);

// Every record of a JSONL file (blank lines skipped). A bad line fails the whole read with its
// line number.
absl::StatusOr<std::vector<Example>> ReadExamples(const std::filesystem::path& path,
                                                  const Tokens& tokens, int max_length);

// Packs examples [first, first + count) of `order` into one right-padded batch whose length is
// that of its longest example. Padding takes `pad_id` with label -100.
TokenBatch MakeBatch(const std::vector<Example>& examples, const std::vector<size_t>& order,
                     size_t first, size_t count, int32_t pad_id);
// The same into `batch`, reusing its buffers (no allocation once they are large enough).
void FillBatch(const std::vector<Example>& examples, const std::vector<size_t>& order, size_t first,
               size_t count, int32_t pad_id, TokenBatch& batch);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_DATASET_H_
