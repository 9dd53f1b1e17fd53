// The dataset reader on hostile JSONL: instruction records ({"instruction", "input", "output"}),
// text records and pre-tokenised ones ({"input_ids", "labels"}), read from a real file with a
// byte-level tokenizer. Either every record becomes an example within max_length whose ids are
// in the vocabulary, or the read fails with a status naming the line.
#include <cstdint>
#include <string>

#include "common/llm/dataset.h"
#include "common/llm/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

using namespace fedlora::common;

namespace {
const Tokenizer& TheTokenizer() {
  static const Tokenizer tokenizer = [] {
    auto t =
        Tokenizer::Parse(TrainByteLevelTokenizer(
                             {"### Instruction:\nthe answer is 42\n### Response:\n"}, 40, {"</s>"}),
                         "trained");
    FUZZ_CHECK(t.ok());
    return *std::move(t);
  }();
  return tokenizer;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = fedlora::fuzz::ScratchDir() / "data.jsonl";
  fedlora::fuzz::WriteFile(path, std::string_view(reinterpret_cast<const char*>(data), size));
  const Tokenizer& tokenizer = TheTokenizer();
  const Tokens tokens{&tokenizer, tokenizer.vocab_size() - 1, tokenizer.vocab_size()};
  constexpr int kMaxLength = 64;
  auto examples = ReadExamples(path, tokens, kMaxLength);
  if (!examples.ok()) return 0;
  for (const Example& e : *examples) {
    FUZZ_CHECK(e.input_ids.size() <= kMaxLength && e.labels.size() == e.input_ids.size());
    for (int32_t id : e.input_ids) FUZZ_CHECK(id >= 0 && id < tokens.vocab_size);
    for (int32_t label : e.labels)
      FUZZ_CHECK(label == -100 || (label >= 0 && label < tokens.vocab_size));
  }
  return 0;
}
