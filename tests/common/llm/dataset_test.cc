// JSONL records to token ids and labels, checked on a bytes-only tokenizer, where every byte is
// its own token, so the expected ids are the bytes of the text.
#include "common/llm/dataset.h"

#include <gtest/gtest.h>

#include <fstream>

#include "absl/strings/str_format.h"
#include "common/base/strings.h"
#include "tests/test_util.h"

namespace fedlora::common {
namespace {

using Ids = std::vector<int32_t>;

// Bytes 0..255, then <s> 256 and </s> 257; the post-processor puts <s> first when `bos`.
Tokenizer BytesOnly(bool bos = false) {
  nlohmann::json j = TrainByteLevelTokenizer({}, 0, {"<s>", "</s>"});
  if (bos)
    j["post_processor"] = {
        {"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}}};
  return *Tokenizer::Parse(j, "bytes");
}

Ids Bytes(const std::string& s) { return Ids(s.begin(), s.end()); }

TEST(DatasetTest, InstructionRecordsTrainOnTheResponseOnly) {
  const Tokenizer tok = BytesOnly(true);
  const Tokens tokens{&tok, 257, tok.vocab_size()};
  auto ex = ParseExample({{"instruction", "Say hi"}, {"input", ""}, {"output", "hi"}}, tokens, 1000,
                         "f:1");
  ASSERT_TRUE(ex.ok()) << ex.status();
  const std::string prompt =
      "Below is an instruction that describes a task. Write a response that appropriately "
      "completes the request.\n\n### Instruction:\nSay hi\n\n### Response:\n";
  Ids ids{256};
  for (int32_t b : Bytes(prompt + "hi")) ids.push_back(b);
  ids.push_back(257);
  EXPECT_EQ(ex->input_ids, ids);
  Ids labels(1 + prompt.size(), -100);
  labels.insert(labels.end(), {'h', 'i', 257});
  EXPECT_EQ(ex->labels, labels);
  // With an input, the template names it.
  auto with_input =
      ParseExample({{"instruction", "A"}, {"input", "B"}, {"output", "C"}}, tokens, 1000, "f:1");
  ASSERT_TRUE(with_input.ok());
  EXPECT_EQ(tok.Decode(with_input->input_ids, true),
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nA\n\n### Input:\nB\n\n### Response:\nC");
}

// Llama 2's tokenizer prepends "▁" to each text it encodes: prompt and response are one text, so
// the response gets none (LLM-Adapters' tokenisation; two encodes would put a "▁" before "hi").
TEST(DatasetTest, InstructionRecordsAreOneTextForTheTokenizer) {
  nlohmann::json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {"\u2581", 259}};
  for (int b = 0; b < 256; ++b)
    vocab[StrCat("<0x", b < 16 ? "0" : "", absl::StrFormat("%X", b), ">")] = 3 + b;
  const nlohmann::json json = {
      {"model",
       {{"type", "BPE"},
        {"vocab", vocab},
        {"merges", nlohmann::json::array()},
        {"byte_fallback", true},
        {"unk_token", "<unk>"}}},
      {"added_tokens",
       {{{"id", 1}, {"content", "<s>"}, {"special", true}},
        {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
      {"normalizer",
       {{"type", "Sequence"},
        {"normalizers",
         {{{"type", "Prepend"}, {"prepend", "\u2581"}},
          {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\u2581"}}}}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}}}}};
  const Tokenizer tok = *Tokenizer::Parse(json, "sp");
  const Tokens tokens{&tok, 2, tok.vocab_size()};
  auto ex = ParseExample({{"instruction", "Say hi"}, {"output", "hi"}}, tokens, 1000, "f:1");
  ASSERT_TRUE(ex.ok()) << ex.status();
  const std::string prompt = InstructionPrompt("Say hi", "");
  Ids ids{1, 259}, labels{-100, -100};
  for (unsigned char c : prompt + "hi") {
    ids.push_back(c == ' ' ? 259 : 3 + c);
    labels.push_back(ids.size() <= 2 + prompt.size() ? -100 : ids.back());
  }
  ids.push_back(2);
  labels.push_back(2);
  EXPECT_EQ(ex->input_ids, ids);
  EXPECT_EQ(ex->labels, labels);
}

TEST(DatasetTest, TextAndPreTokenisedRecords) {
  const Tokenizer tok = BytesOnly();
  const Tokens tokens{&tok, 257, tok.vocab_size()};
  auto text = ParseExample({{"text", "abc"}}, tokens, 1000, "f:1");
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(text->input_ids, (Ids{'a', 'b', 'c'}));  // as the tokenizer has it: no EOS
  EXPECT_EQ(text->labels, text->input_ids);
  auto pre =
      ParseExample({{"input_ids", {5, 6, 7}}, {"labels", {-100, 6, 7}}}, tokens, 1000, "f:1");
  ASSERT_TRUE(pre.ok());
  EXPECT_EQ(pre->labels, (Ids{-100, 6, 7}));
  auto plain = ParseExample({{"input_ids", {5, 6, 7}}}, tokens, 2, "f:1");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->input_ids, (Ids{5, 6}));  // truncated to 2
  EXPECT_EQ(plain->labels, (Ids{5, 6}));
}

TEST(DatasetTest, BadLinesAreReportedWithTheirNumber) {
  const Tokenizer tok = BytesOnly();
  const Tokens tokens{&tok, -1, tok.vocab_size()};
  fedlora::testing::ScratchDir dir;
  auto read = [&](const std::string& content) {
    std::ofstream(dir.path() / "d.jsonl") << content;
    return ReadExamples(dir.path() / "d.jsonl", tokens, 100);
  };
  auto ok = read("{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n");
  ASSERT_TRUE(ok.ok());
  EXPECT_EQ(ok->size(), 2u);
  auto expect = [&](const std::string& content, const std::string& needle) {
    auto r = read(content);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.status().message().find(needle), std::string::npos) << r.status();
  };
  expect("{\"text\": \"a\"}\n{\"text\": \"b\"\n", "d.jsonl:2: not valid JSON");
  expect("{\"text\": \"a\"}\n{\"prompt\": \"b\"}\n", "d.jsonl:2: expected {\"instruction\"");
  expect("{\"input_ids\": [1, 999]}\n", "d.jsonl:1: \"input_ids\" holds 999");
  expect("{\"input_ids\": [1, 2], \"labels\": [1]}\n", "1 labels for 2 input_ids");
  expect("{\"instruction\": \"x\"}\n", "needs \"output\"");
  expect("", "no records");
}

TEST(DatasetTest, BatchesAreRightPaddedWithIgnoredLabels) {
  const std::vector<Example> ex = {{{1, 2, 3}, {1, 2, 3}}, {{4}, {4}}};
  const TokenBatch b = MakeBatch(ex, {1, 0}, 0, 2, 9);
  EXPECT_EQ(b.batch, 2);
  EXPECT_EQ(b.seq, 3);
  EXPECT_EQ(b.input_ids, (Ids{4, 9, 9, 1, 2, 3}));
  EXPECT_EQ(b.labels, (Ids{4, -100, -100, 1, 2, 3}));
  EXPECT_EQ(b.TargetCount(), 2);  // labels[t+1] for t+1 ≥ 1: 2 and 3
}

}  // namespace
}  // namespace fedlora::common
