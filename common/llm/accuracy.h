// Accuracy of generated answers, by the protocol of LLM-Adapters (Hu et al. 2023), which the Fed-SB
// and LoRA-SB papers evaluate commonsense and arithmetic tasks with: the model answers the
// instruction prompt by greedy decoding, and the answer extracted from its response must equal the
// record's `answer` field.
//
// Extraction, as LLM-Adapters' commonsense_evaluate.py and evaluate.py do it:
//   - a choice task (the instruction names its choices, "Answer format: answer1/answer2/..."):
//     the first choice that occurs in the response (its regex alternation's leftmost match);
//   - a numeric answer: the last number in the response (commas removed), equal within 0.001;
//   - otherwise the response itself, without surrounding whitespace.
// A response that names no choice or no number is wrong.
#ifndef FEDLORA_COMMON_LLM_ACCURACY_H_
#define FEDLORA_COMMON_LLM_ACCURACY_H_

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/llm/decoder.h"
#include "common/llm/tokenizer.h"

namespace fedlora::common {

// The choices an instruction's "Answer format: a/b/c" line names (empty without one).
std::vector<std::string> AnswerChoices(const std::string& instruction);

// The answer `response` gives (see the top of this file): a choice, the number's text, or the
// trimmed response; nullopt when it names no choice or no number.
std::optional<std::string> ExtractAnswer(const std::string& response,
                                         const std::vector<std::string>& choices,
                                         const std::string& answer);

// Whether `response` answers `answer`.
bool AnswerIsCorrect(const std::string& response, const std::vector<std::string>& choices,
                     const std::string& answer);

// An instruction record with an answer, its prompt tokenised as training tokenises it (the
// tokenizer's prefix, then the template's prompt).
struct AnswerRecord {
  std::vector<int32_t> prompt;
  std::vector<std::string> choices;
  std::string answer;
  std::string task;  // the record's "task" field, else its "category" (empty without either)
};

// The records of a JSONL file that carry an `answer` (others are skipped); errors name the line.
absl::StatusOr<std::vector<AnswerRecord>> ReadAnswerRecords(const std::filesystem::path& path,
                                                            const Tokenizer& tokenizer);

struct AccuracyResult {
  int64_t correct = 0;
  std::vector<std::string> responses;  // per record, EOS not included
  std::vector<bool> is_correct;        // per record
  double accuracy() const {
    return responses.empty() ? 0.0 : static_cast<double>(correct) / responses.size();
  }
};

// The accuracy over each task's records (AnswerRecord::task; records without one are left out).
std::map<std::string, double> AccuracyByTask(const std::vector<AnswerRecord>& records,
                                             const AccuracyResult& result);

// Generates a response to every record (record i samples with seed + i, so the result does not
// depend on `threads`; 0 = all cores) and scores it.
absl::StatusOr<AccuracyResult> MeasureAccuracy(const LlamaWeights& weights, const Adapter* adapter,
                                               const Tokenizer& tokenizer,
                                               std::span<const int32_t> eos,
                                               const std::vector<AnswerRecord>& records,
                                               const SamplingOptions& options, uint64_t seed = 0,
                                               int threads = 0);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_ACCURACY_H_
