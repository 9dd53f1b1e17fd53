// The tokenizer.json reader and the encoder and decoder it builds. The input is a text, then
// (after the first NUL, if there is one) a tokenizer.json: the seeds are the real pipelines of
// Llama 2/3, Qwen3, Gemma 3 and DeepSeek-V3 with cut vocabularies (make_tokenizer_seeds.py). A
// document that parses gives a tokenizer whose ids for the text (with and without special tokens)
// are all in the vocabulary and decode without failing; one that does not is refused with a status.
#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>

#include "common/llm/tokenizer.h"
#include "tests/fuzz/fuzz_util.h"

using fedlora::common::Tokenizer;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  if (nul == std::string::npos) return 0;
  const std::string text = input.substr(0, nul);
  const nlohmann::json json = nlohmann::json::parse(input.substr(nul + 1), nullptr, false);
  if (json.is_discarded()) return 0;  // nlohmann's parser is not what this target is for
  auto tokenizer = Tokenizer::Parse(json, "fuzz");
  if (!tokenizer.ok()) return 0;
  for (bool special : {false, true}) {
    const std::vector<int32_t> ids = tokenizer->Encode(text, special);
    for (int32_t id : ids) FUZZ_CHECK(id >= 0 && id < tokenizer->vocab_size());
    const std::string decoded = tokenizer->Decode(ids, special);
    (void)tokenizer->Encode(decoded, false);
  }
  return 0;
}
