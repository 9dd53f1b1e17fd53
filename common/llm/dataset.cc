#include "common/llm/dataset.h"

#include <algorithm>
#include <fstream>

#include "absl/status/status.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {

std::string InstructionPrompt(const std::string& instruction, const std::string& input) {
  if (input.empty())
    return StrCat(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\n",
        instruction, "\n\n### Response:\n");
  return StrCat(
      "Below is an instruction that describes a task, paired with an input that provides further "
      "context. Write a response that appropriately completes the request.\n\n### Instruction:\n",
      instruction, "\n\n### Input:\n", input, "\n\n### Response:\n");
}

namespace {

absl::StatusOr<std::vector<int32_t>> IdList(const nlohmann::json& v, const char* key,
                                            const Tokens& tokens, bool allow_ignore,
                                            const std::string& where) {
  if (!v.is_array())
    return absl::InvalidArgumentError(StrCat(where, ": \"", key, "\" must be an array of ints"));
  std::vector<int32_t> out;
  for (const nlohmann::json& x : v) {
    const bool ok =
        x.is_number_integer() && ((x.get<int64_t>() >= 0 && x.get<int64_t>() < tokens.vocab_size) ||
                                  (allow_ignore && x.get<int64_t>() == -100));
    if (!ok)
      return absl::InvalidArgumentError(StrCat(where, ": \"", key, "\" holds ", x.dump(),
                                               ", expected a token id in [0, ", tokens.vocab_size,
                                               ")", allow_ignore ? " or -100" : ""));
    out.push_back(x.get<int32_t>());
  }
  return out;
}

}  // namespace

absl::StatusOr<std::string> StringField(const nlohmann::json& record, const char* key,
                                        const std::string& where) {
  if (!record.contains(key) || record[key].is_null()) return std::string();
  if (!record[key].is_string())
    return absl::InvalidArgumentError(StrCat(where, ": \"", key, "\" must be a string"));
  return record[key].get<std::string>();
}

absl::StatusOr<Example> ParseExample(const nlohmann::json& record, const Tokens& tokens,
                                     int max_length, const std::string& where) {
  if (!record.is_object())
    return absl::InvalidArgumentError(StrCat(where, ": expected a JSON object"));
  auto string_field = [&](const char* key) { return StringField(record, key, where); };
  Example ex;
  if (record.contains("input_ids")) {
    auto ids = IdList(record["input_ids"], "input_ids", tokens, false, where);
    if (!ids.ok()) return ids.status();
    ex.input_ids = std::move(*ids);
    if (record.contains("labels")) {
      auto labels = IdList(record["labels"], "labels", tokens, true, where);
      if (!labels.ok()) return labels.status();
      if (labels->size() != ex.input_ids.size())
        return absl::InvalidArgumentError(
            StrCat(where, ": ", labels->size(), " labels for ", ex.input_ids.size(), " input_ids"));
      ex.labels = std::move(*labels);
    } else {
      ex.labels = ex.input_ids;
    }
  } else if (record.contains("text") || record.contains("instruction")) {
    if (tokens.tokenizer == nullptr)
      return absl::FailedPreconditionError(StrCat(where, ": text needs a tokenizer"));
    // The post-processor's leading special tokens never carry a loss: nothing precedes them.
    for (int32_t id : tokens.tokenizer->prefix()) {
      ex.input_ids.push_back(id);
      ex.labels.push_back(-100);
    }
    auto append = [&](const std::vector<int32_t>& ids, size_t untrained) {
      for (size_t i = 0; i < ids.size(); ++i) {
        ex.input_ids.push_back(ids[i]);
        ex.labels.push_back(i < untrained ? -100 : ids[i]);
      }
    };
    if (record.contains("text")) {
      auto text = string_field("text");
      if (!text.ok()) return text.status();
      append(tokens.tokenizer->Encode(*text), 0);
      append(tokens.tokenizer->suffix(), 0);
    } else {
      auto instruction = string_field("instruction"), input = string_field("input"),
           output = string_field("output");
      for (const auto* f : {&instruction, &input, &output})
        if (!f->ok()) return f->status();
      if (!record.contains("output"))
        return absl::InvalidArgumentError(
            StrCat(where, ": an instruction record needs \"output\""));
      const std::string prompt = InstructionPrompt(*instruction, *input);
      append(tokens.tokenizer->Encode(prompt + *output), tokens.tokenizer->Encode(prompt).size());
      if (tokens.eos >= 0) append({tokens.eos}, 0);  // the response ends: the model learns to stop
    }
  } else {
    std::string keys;
    for (const auto& [k, v] : record.items()) keys += (keys.empty() ? "" : ", ") + k;
    return absl::InvalidArgumentError(
        StrCat(where, ": expected {\"instruction\", \"input\", \"output\"}, {\"text\"} or ",
               "{\"input_ids\", \"labels\"}, got keys [", keys, "]"));
  }
  if (ex.input_ids.empty())
    return absl::InvalidArgumentError(StrCat(where, ": the record has no tokens"));
  if (static_cast<int>(ex.input_ids.size()) > max_length) {
    ex.input_ids.resize(static_cast<size_t>(max_length));
    ex.labels.resize(static_cast<size_t>(max_length));
  }
  return ex;
}

int64_t TargetCount(const Example& e) {
  return e.labels.empty() ? 0 : std::count_if(e.labels.begin() + 1, e.labels.end(), [](int32_t l) {
    return l != -100;
  });
}

absl::Status ForEachJsonRecord(
    const std::filesystem::path& path,
    const std::function<absl::Status(const nlohmann::json&, const std::string&)>& fn) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(StrCat("cannot read data file ", path.string()));
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = StrCat(path.string(), ":", number);
    nlohmann::json record = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (record.is_discarded()) return absl::InvalidArgumentError(StrCat(where, ": not valid JSON"));
    RETURN_IF_ERROR(fn(record, where));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Example>> ReadExamples(const std::filesystem::path& path,
                                                  const Tokens& tokens, int max_length) {
  std::vector<Example> out;
  RETURN_IF_ERROR(ForEachJsonRecord(
      path, [&](const nlohmann::json& record, const std::string& where) -> absl::Status {
        ASSIGN_OR_RETURN(Example ex, ParseExample(record, tokens, max_length, where));
        out.push_back(std::move(ex));
        return absl::OkStatus();
      }));
  if (out.empty()) return absl::InvalidArgumentError(StrCat(path.string(), ": no records"));
  return out;
}

TokenBatch MakeBatch(const std::vector<Example>& examples, const std::vector<size_t>& order,
                     size_t first, size_t count, int32_t pad_id) {
  TokenBatch b;
  FillBatch(examples, order, first, count, pad_id, b);
  return b;
}

void FillBatch(const std::vector<Example>& examples, const std::vector<size_t>& order, size_t first,
               size_t count, int32_t pad_id, TokenBatch& b) {
  b.batch = static_cast<int>(count);
  b.seq = 2;
  for (size_t i = 0; i < count; ++i)
    b.seq = std::max(b.seq, static_cast<int>(examples[order[first + i]].input_ids.size()));
  b.input_ids.assign(count * b.seq, pad_id);
  b.labels.assign(count * b.seq, -100);
  for (size_t i = 0; i < count; ++i) {
    const Example& ex = examples[order[first + i]];
    std::copy(ex.input_ids.begin(), ex.input_ids.end(), b.input_ids.begin() + i * b.seq);
    std::copy(ex.labels.begin(), ex.labels.end(), b.labels.begin() + i * b.seq);
  }
}

}  // namespace fedlora::common
