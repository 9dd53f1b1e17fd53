#include "common/llm/accuracy.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/str_split.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/dataset.h"

namespace fedlora::common {
namespace {

// The numbers of `text` as LLM-Adapters' r'-?\d+\.?\d*' finds them, commas removed first.
std::vector<std::string> Numbers(const std::string& text) {
  std::string s;
  for (char c : text)
    if (c != ',') s += c;
  std::vector<std::string> out;
  auto digit = [&](size_t i) { return i < s.size() && s[i] >= '0' && s[i] <= '9'; };
  for (size_t i = 0; i < s.size();) {
    const size_t start = i;
    if (s[i] == '-' && digit(i + 1)) ++i;
    if (!digit(i)) {
      i = start + 1;
      continue;
    }
    while (digit(i)) ++i;
    if (i < s.size() && s[i] == '.') {
      ++i;
      while (digit(i)) ++i;
    }
    out.push_back(s.substr(start, i - start));
  }
  return out;
}

std::optional<double> ParseNumber(const std::string& text) {
  const auto numbers = Numbers(text);
  if (numbers.size() != 1 ||
      numbers[0].size() != std::string(absl::StripAsciiWhitespace(text)).size())
    return std::nullopt;
  return std::stod(numbers[0]);
}

}  // namespace

std::vector<std::string> AnswerChoices(const std::string& instruction) {
  static constexpr char kMarker[] = "Answer format:";
  const size_t at = instruction.rfind(kMarker);
  if (at == std::string::npos) return {};
  std::string line = instruction.substr(at + sizeof(kMarker) - 1);
  line = line.substr(0, line.find('\n'));
  std::vector<std::string> choices;
  for (absl::string_view c : absl::StrSplit(line, '/')) {
    c = absl::StripAsciiWhitespace(c);
    if (!c.empty()) choices.emplace_back(c);
  }
  return choices;
}

std::optional<std::string> ExtractAnswer(const std::string& response,
                                         const std::vector<std::string>& choices,
                                         const std::string& answer) {
  if (!choices.empty()) {
    for (size_t i = 0; i < response.size(); ++i)
      for (const std::string& c : choices)
        if (response.compare(i, c.size(), c) == 0) return c;
    return std::nullopt;
  }
  if (ParseNumber(answer)) {
    const auto numbers = Numbers(response);
    if (numbers.empty()) return std::nullopt;
    return numbers.back();
  }
  return std::string(absl::StripAsciiWhitespace(response));
}

bool AnswerIsCorrect(const std::string& response, const std::vector<std::string>& choices,
                     const std::string& answer) {
  const std::optional<std::string> given = ExtractAnswer(response, choices, answer);
  if (!given) return false;
  if (choices.empty()) {
    if (const auto expected = ParseNumber(answer))
      return std::abs(std::stod(*given) - *expected) <= 0.001;
  }
  return *given == absl::StripAsciiWhitespace(answer);
}

absl::StatusOr<std::vector<AnswerRecord>> ReadAnswerRecords(const std::filesystem::path& path,
                                                            const Tokenizer& tokenizer) {
  std::vector<AnswerRecord> out;
  RETURN_IF_ERROR(ForEachJsonRecord(
      path, [&](const nlohmann::json& record, const std::string& where) -> absl::Status {
        if (!record.is_object() || !record.contains("answer")) return absl::OkStatus();
        auto text = [&](const char* key) { return StringField(record, key, where); };
        ASSIGN_OR_RETURN(std::string instruction, text("instruction"));
        ASSIGN_OR_RETURN(std::string input, text("input"));
        ASSIGN_OR_RETURN(std::string answer, text("answer"));
        if (instruction.empty())
          return absl::InvalidArgumentError(
              StrCat(where, ": a record with an \"answer\" needs an \"instruction\""));
        ASSIGN_OR_RETURN(std::string task, text("task"));
        ASSIGN_OR_RETURN(std::string category, text("category"));
        if (task.empty()) task = std::move(category);
        AnswerRecord r{tokenizer.prefix(), AnswerChoices(instruction), std::move(answer),
                       std::move(task)};
        for (int32_t id : tokenizer.Encode(InstructionPrompt(instruction, input)))
          r.prompt.push_back(id);
        out.push_back(std::move(r));
        return absl::OkStatus();
      }));
  if (out.empty())
    return absl::InvalidArgumentError(
        StrCat(path.string(), " has no instruction records with an \"answer\" field"));
  return out;
}

absl::StatusOr<AccuracyResult> MeasureAccuracy(const LlamaWeights& weights, const Adapter* adapter,
                                               const Tokenizer& tokenizer,
                                               std::span<const int32_t> eos,
                                               const std::vector<AnswerRecord>& records,
                                               const SamplingOptions& options, uint64_t seed,
                                               int threads) {
  std::vector<std::vector<int32_t>> prompts;
  for (const AnswerRecord& r : records) prompts.push_back(r.prompt);
  ASSIGN_OR_RETURN(auto generated,
                   GenerateAll(weights, adapter, prompts, eos, options, seed, threads));
  AccuracyResult result;
  for (size_t i = 0; i < records.size(); ++i) {
    std::vector<int32_t>& ids = generated[i];
    if (!ids.empty() && std::find(eos.begin(), eos.end(), ids.back()) != eos.end()) ids.pop_back();
    result.responses.push_back(tokenizer.Decode(ids, true));
    result.is_correct.push_back(
        AnswerIsCorrect(result.responses.back(), records[i].choices, records[i].answer));
    result.correct += result.is_correct.back();
  }
  return result;
}

std::map<std::string, double> AccuracyByTask(const std::vector<AnswerRecord>& records,
                                             const AccuracyResult& result) {
  std::map<std::string, std::pair<int64_t, int64_t>> counts;  // right, all
  for (size_t i = 0; i < records.size(); ++i) {
    if (records[i].task.empty()) continue;
    auto& [right, all] = counts[records[i].task];
    right += result.is_correct[i];
    ++all;
  }
  std::map<std::string, double> out;
  for (const auto& [task, c] : counts)
    out[task] = static_cast<double>(c.first) / static_cast<double>(c.second);
  return out;
}

}  // namespace fedlora::common
