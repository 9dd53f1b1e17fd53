// TrainByteLevelTokenizer (tokenizer.h): a byte-level BPE tokenizer.json learned from a corpus,
// for checkpoints made from scratch.
#include <map>
#include <utility>

#include "common/llm/tokenizer.h"
#include "common/llm/tokenizer_text.h"

namespace fedlora::common {

using tokenizer_text::Behavior;
using tokenizer_text::Compile;
using tokenizer_text::kGpt2Pattern;
using tokenizer_text::Piece;
using tokenizer_text::SplitPiece;

nlohmann::json TrainByteLevelTokenizer(const std::vector<std::string>& corpus, int merges,
                                       const std::vector<std::string>& special_tokens) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(ByteToUnicode(static_cast<uint8_t>(b)));

  // Words of the corpus as symbol sequences, with their counts.
  std::map<std::string, int64_t> word_counts;
  {
    const Pcre gpt2 = *Compile(kGpt2Pattern, false, "gpt2");
    for (const std::string& text : corpus) {
      std::vector<Piece> words;
      SplitPiece({text, true}, gpt2, Behavior::kIsolated, false, words);
      for (const Piece& w : words) ++word_counts[w.text];
    }
  }
  std::vector<std::pair<std::vector<int32_t>, int64_t>> words;
  for (const auto& [w, n] : word_counts) {
    std::vector<int32_t> symbols;
    for (unsigned char b : w) symbols.push_back(b);
    words.push_back({std::move(symbols), n});
  }
  nlohmann::json merge_list = nlohmann::json::array();
  for (int m = 0; m < merges; ++m) {
    std::map<std::pair<int32_t, int32_t>, int64_t> pairs;
    for (const auto& [symbols, n] : words)
      for (size_t i = 0; i + 1 < symbols.size(); ++i) pairs[{symbols[i], symbols[i + 1]}] += n;
    auto best = pairs.end();
    for (auto it = pairs.begin(); it != pairs.end(); ++it)
      if (best == pairs.end() || it->second > best->second) best = it;  // ties: smallest pair
    if (best == pairs.end() || best->second < 2) break;
    const auto [a, b] = best->first;
    const int32_t id = static_cast<int32_t>(tokens.size());
    tokens.push_back(tokens[a] + tokens[b]);
    merge_list.push_back(tokens[a] + " " + tokens[b]);
    for (auto& [symbols, n] : words)
      for (size_t i = 0; i + 1 < symbols.size(); ++i)
        if (symbols[i] == a && symbols[i + 1] == b) {
          symbols[i] = id;
          symbols.erase(symbols.begin() + static_cast<ptrdiff_t>(i) + 1);
        }
  }
  nlohmann::json vocab = nlohmann::json::object();
  for (size_t i = 0; i < tokens.size(); ++i) vocab[tokens[i]] = i;
  nlohmann::json added = nlohmann::json::array();
  for (const std::string& s : special_tokens)
    added.push_back({{"id", vocab.size() + added.size()},
                     {"content", s},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  const nlohmann::json byte_level = {{"type", "ByteLevel"},
                                     {"add_prefix_space", false},
                                     {"trim_offsets", true},
                                     {"use_regex", true}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", byte_level},
          {"post_processor", byte_level},
          {"decoder", byte_level},
          {"model",
           {{"type", "BPE"},
            {"dropout", nullptr},
            {"unk_token", nullptr},
            {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr},
            {"fuse_unk", false},
            {"byte_fallback", false},
            {"ignore_merges", false},
            {"vocab", vocab},
            {"merges", merge_list}}}};
}

}  // namespace fedlora::common
