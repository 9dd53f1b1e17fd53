// Byte-level BPE on small hand-made vocabularies whose expected ids are derived by hand in the
// comments; byte ids are the byte values because the vocabularies list the 256 byte symbols first,
// in byte order.
#include "common/llm/tokenizer.h"

#include <gtest/gtest.h>

namespace fedlora::common {
namespace {

using Ids = std::vector<int32_t>;

// Vocabulary: bytes 0..255, then `extra` tokens from id 256 on; merges in rank order.
nlohmann::json HandMade(const std::vector<std::string>& extra,
                        const std::vector<std::string>& merges, nlohmann::json pre_tokenizer,
                        bool ignore_merges = false) {
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[ByteToUnicode(static_cast<uint8_t>(b))] = b;
  for (size_t i = 0; i < extra.size(); ++i) vocab[extra[i]] = 256 + i;
  return {
      {"model",
       {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}, {"ignore_merges", ignore_merges}}},
      {"added_tokens",
       {{{"id", 300}, {"content", "<|im_start|>"}, {"special", true}},
        {{"id", 301}, {"content", "<|im_end|>"}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", pre_tokenizer},
      {"decoder", {{"type", "ByteLevel"}}}};
}

const nlohmann::json kByteLevel = {
    {"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}};

Tokenizer Make(const nlohmann::json& json) {
  auto t = Tokenizer::Parse(json, "test");
  EXPECT_TRUE(t.ok()) << t.status();
  return std::move(*t);
}

TEST(TokenizerTest, ByteAlphabetIsGpt2s) {
  EXPECT_EQ(ByteToUnicode('a'), "a");
  EXPECT_EQ(ByteToUnicode(' '), "\u0120");   // Ġ: byte 32 is the 33rd non-printable byte
  EXPECT_EQ(ByteToUnicode('\n'), "\u010A");  // Ċ: 256 + 10
  EXPECT_EQ(ByteToUnicode(0x7F), "\u0121");  // bytes 127..160 follow 0..32
  EXPECT_EQ(ByteToUnicode(0xAD), "\u0143");  // soft hyphen: the last shifted byte, 256 + 67
  EXPECT_EQ(ByteToUnicode(0xE9), "\u00E9");  // é stands for itself
}

TEST(TokenizerTest, MergesApplyByRankWithinGpt2Pieces) {
  // 256 "ll" (rank 0), 257 "he" (1), 258 "hell" (2), 259 "hello" (3), 260 "Ġw" (4), 261 "ĠĠ" (5).
  const Tokenizer t = Make(HandMade({"ll", "he", "hell", "hello", "Ġw", "ĠĠ"},
                                    {"l l", "h e", "he ll", "hell o", "Ġ w", "Ġ Ġ"}, kByteLevel));
  // "hello": h e l l o → h e ll o → he ll o → hell o → hello. " world": Ġw o r l d.
  EXPECT_EQ(t.Encode("hello world"), (Ids{259, 260, 'o', 'r', 'l', 'd'}));
  // "lll": the leftmost pair of equal rank merges first.
  EXPECT_EQ(t.Encode("lll"), (Ids{256, 'l'}));
  // "a  b" splits as "a", " ", " b" (\s+(?!\S) leaves the space before b to " b"), so the two
  // spaces never meet; at the end of the text they are one piece and merge.
  EXPECT_EQ(t.Encode("a  b"), (Ids{'a', ' ', ' ', 'b'}));
  EXPECT_EQ(t.Encode("a  "), (Ids{'a', 261}));
  // Contractions are their own pieces: "it", "'s".
  EXPECT_EQ(t.Encode("he's"), (Ids{257, '\'', 's'}));
  // Added tokens are matched verbatim and never merged with their neighbours.
  EXPECT_EQ(t.Encode("<|im_start|>hello<|im_end|>"), (Ids{300, 259, 301}));
  EXPECT_EQ(t.Decode({300, 259, 301}), "<|im_start|>hello<|im_end|>");
  EXPECT_EQ(t.Decode({300, 259, 301}, /*skip_special=*/true), "hello");
  EXPECT_EQ(t.TokenId("hell"), 258);
  EXPECT_EQ(t.vocab_size(), 302);
}

TEST(TokenizerTest, DigitsAndSplitPreTokenizers) {
  // 256 "12". With individual digits "123" is three pieces, so "1 2" never applies.
  const nlohmann::json digits = {
      {"type", "Sequence"},
      {"pretokenizers", {{{"type", "Digits"}, {"individual_digits", true}}, kByteLevel}}};
  EXPECT_EQ(Make(HandMade({"12"}, {"1 2"}, digits)).Encode("x123"), (Ids{'x', '1', '2', '3'}));
  EXPECT_EQ(Make(HandMade({"12"}, {"1 2"}, kByteLevel)).Encode("x123"), (Ids{'x', 256, '3'}));

  // Llama 3's layout: a Split regex, then ByteLevel without its own regex; ignore_merges takes a
  // piece that is a whole vocabulary entry (256 "Ġworld") even though no merge builds it.
  const nlohmann::json split = {
      {"type", "Sequence"},
      {"pretokenizers",
       {{{"type", "Split"},
         {"pattern", {{"Regex", R"( ?\p{L}+|\s+)"}}},
         {"behavior", "Isolated"},
         {"invert", false}},
        {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
  EXPECT_EQ(Make(HandMade({"Ġworld"}, {}, split, true)).Encode("hi world"), (Ids{'h', 'i', 256}));
  EXPECT_EQ(Make(HandMade({"Ġworld"}, {}, split, false)).Encode("hi world"),
            (Ids{'h', 'i', ' ', 'w', 'o', 'r', 'l', 'd'}));
}

TEST(TokenizerTest, MultiByteTextRoundTrips) {
  const Tokenizer t = Make(HandMade({"Ã©"}, {"Ã ©"}, kByteLevel));
  const std::string text = "héllo wörld — 你好, 🙂\n\ttabs  and  spaces ";
  const Ids ids = t.Encode(text);
  EXPECT_EQ(t.Decode(ids), text);
  // é is 0xC3 0xA9, whose byte symbols Ã and © merge into token 256.
  EXPECT_EQ(t.Encode("é"), (Ids{256}));
  EXPECT_EQ(t.Encode("你"), (Ids{0xE4, 0xBD, 0xA0}));
}

TEST(TokenizerTest, PostProcessorBos) {
  nlohmann::json j = HandMade({}, {}, kByteLevel);
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single",
                          {{{"SpecialToken", {{"id", "<|im_start|>"}, {"type_id", 0}}}},
                           {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}}};
  EXPECT_EQ(Make(j).bos_id(), 300);
  EXPECT_EQ(Make(HandMade({}, {}, kByteLevel)).bos_id(), -1);
}

TEST(TokenizerTest, RefusesOtherKindsByName) {
  auto refused = [](nlohmann::json j, const char* needle) {
    auto t = Tokenizer::Parse(j, "tok.json");
    ASSERT_FALSE(t.ok());
    EXPECT_NE(t.status().message().find(needle), std::string::npos) << t.status();
  };
  nlohmann::json j = HandMade({}, {}, kByteLevel);
  j["normalizer"] = {{"type", "NFC"}};
  refused(j, "normalizer NFC");
  j = HandMade({}, {}, {{"type", "Metaspace"}});
  refused(j, "pre-tokenizer Metaspace");
  j = HandMade({}, {}, kByteLevel);
  j["model"]["vocab"].erase(ByteToUnicode(' '));
  refused(j, "byte 32");
  j = HandMade({}, {"x y"}, kByteLevel);
  refused(j, "not in the vocab");
}

TEST(TokenizerTest, TrainsMergesByFrequency) {
  // Words "aaa" ×1 and " aaa" ×2: pair (a,a) occurs 2 + 2·2 = 6 times, (Ġ,a) 2 → merge "a a";
  // then (aa,a) 1 + 2 = 3 beats (Ġ,aa) 2 → merge "aa a".
  const nlohmann::json j = TrainByteLevelTokenizer({"aaa aaa aaa"}, 5, {"<|endoftext|>"});
  EXPECT_EQ(j["model"]["merges"], (nlohmann::json{"a a", "aa a", "Ġ aaa"}));
  const Tokenizer t = Make(j);
  EXPECT_EQ(t.Encode("aaa aaa<|endoftext|>"), (Ids{257, 258, 259}));
  EXPECT_EQ(t.vocab_size(), 260);
}

}  // namespace
}  // namespace fedlora::common
