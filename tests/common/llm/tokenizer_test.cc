// Byte-level BPE on small hand-made vocabularies whose expected ids are derived by hand in the
// comments; byte ids are the byte values because the vocabularies list the 256 byte symbols first,
// in byte order.
#include "common/llm/tokenizer.h"

#include <gtest/gtest.h>

namespace fedlora::common {
namespace {

using Ids = std::vector<int32_t>;

Ids Bytes(const std::string& s) {
  Ids ids;
  for (unsigned char c : s) ids.push_back(c);
  return ids;
}

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
    ASSERT_FALSE(t.ok()) << needle;
    EXPECT_NE(t.status().message().find(needle), std::string::npos) << t.status();
  };
  nlohmann::json j = HandMade({}, {}, kByteLevel);
  j["normalizer"] = {{"type", "BertNormalizer"}};
  refused(j, "normalizer BertNormalizer");
  j["normalizer"] = {{"type", "Precompiled"}, {"precompiled_charsmap", "AAA="}};
  refused(j, "normalizer Precompiled");
  refused(HandMade({}, {}, {{"type", "Whitespace"}}), "pre-tokenizer Whitespace");
  j = HandMade({}, {}, kByteLevel);
  j["decoder"] = {{"type", "WordPiece"}};
  refused(j, "decoder WordPiece");
  // Found by the tokenizer fuzzer: a "type" that is not a string threw out of Parse (abort).
  j = HandMade({}, {}, kByteLevel);
  j["normalizer"] = {{"type", {1, 2}}};
  refused(j, "tok.json: not a tokenizer.json fedlora can read: [json.exception.type_error.302]");
  j = HandMade({}, {}, kByteLevel);
  j["model"]["type"] = "Unigram";
  refused(j, "model type \"Unigram\"");
  j = HandMade({}, {}, kByteLevel);
  j["model"]["dropout"] = 0.1;
  refused(j, "dropout");
  j = HandMade({}, {}, {{"type", "Metaspace"}, {"prepend_scheme", "sometimes"}});
  refused(j, "prepend_scheme \"sometimes\"");
  j = HandMade({}, {}, kByteLevel);
  j["model"]["unk_token"] = "<nope>";
  refused(j, "unk_token \"<nope>\" is not in the vocab");
  j = HandMade({}, {}, kByteLevel);
  j["model"]["vocab"].erase(ByteToUnicode(' '));
  refused(j, "byte 32");
  j = HandMade({}, {"x y"}, kByteLevel);
  refused(j, "not in the vocab");
}

// A SentencePiece-style BPE as Llama 2 ships it: <unk> <s> </s>, the 256 byte tokens <0x00>.. at
// 3.., then ▁ 259, a 260, b 261, ▁a 262, ab 263, ▁ab 264; merges "▁ a", "a b", "▁a b".
nlohmann::json SentencePieceStyle(bool byte_fallback = true, bool fuse_unk = true) {
  nlohmann::json vocab = {{"<unk>", 0}, {"<s>", 1},  {"</s>", 2}, {"▁", 259},  {"a", 260},
                          {"b", 261},   {"▁a", 262}, {"ab", 263}, {"▁ab", 264}};
  static constexpr char kHex[] = "0123456789ABCDEF";
  for (int b = 0; b < 256; ++b)
    if (byte_fallback) vocab[std::string("<0x") + kHex[b >> 4] + kHex[b & 15] + ">"] = 3 + b;
  return {{"model",
           {{"type", "BPE"},
            {"vocab", vocab},
            {"merges", {"▁ a", "a b", "▁a b"}},
            {"unk_token", "<unk>"},
            {"byte_fallback", byte_fallback},
            {"fuse_unk", fuse_unk}}},
          {"added_tokens",
           {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
            {{"id", 1}, {"content", "<s>"}, {"special", true}},
            {{"id", 2}, {"content", "</s>"}, {"special", true}}}},
          {"normalizer",
           {{"type", "Sequence"},
            {"normalizers",
             {{{"type", "Prepend"}, {"prepend", "▁"}},
              {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "▁"}}}}}},
          {"pre_tokenizer", nullptr},
          {"post_processor",
           {{"type", "TemplateProcessing"},
            {"single", {{{"SpecialToken", {{"id", "<s>"}}}}, {{"Sequence", {{"id", "A"}}}}}},
            {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}}}}}}},
          {"decoder",
           {{"type", "Sequence"},
            {"decoders",
             {{{"type", "Replace"}, {"pattern", {{"String", "▁"}}}, {"content", " "}},
              {{"type", "ByteFallback"}},
              {{"type", "Fuse"}},
              {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}}}};
}

TEST(TokenizerTest, SentencePieceStyleBpeWithByteFallback) {
  const Tokenizer t = Make(SentencePieceStyle());
  // "ab ab" → "▁ab▁ab"; ▁ a merges at 0 then at 3 (leftmost first), then ▁a b twice.
  EXPECT_EQ(t.Encode("ab ab"), (Ids{264, 264}));
  EXPECT_EQ(t.Decode({264, 264}), "ab ab");
  // ç is not in the vocabulary: its bytes C3 A7 as <0xC3> <0xA7> (3 + byte).
  EXPECT_EQ(t.Encode("ç"), (Ids{259, 3 + 0xC3, 3 + 0xA7}));
  EXPECT_EQ(t.Decode({259, 3 + 0xC3, 3 + 0xA7}), "ç");
  EXPECT_EQ(t.Decode({3 + 0xC3}), "\xEF\xBF\xBD");  // a lone lead byte: U+FFFD
  // Each stretch between added tokens is normalized on its own: both get their "▁".
  EXPECT_EQ(t.Encode("a<s>a"), (Ids{262, 1, 262}));
  EXPECT_EQ(t.Encode("a", true), (Ids{1, 262}));
  EXPECT_EQ(t.bos_id(), 1);
  EXPECT_EQ(t.Decode({1, 262}), "<s> a");  // Strip removes one leading space of the fused text
  EXPECT_EQ(t.Decode({1, 262}, true), "a");
  EXPECT_EQ(t.Encode(" a"), (Ids{259, 262}));
  EXPECT_EQ(t.Decode(t.Encode("  two  spaces ")), "  two  spaces ");
  // Without byte fallback, unknown characters are <unk>: fused into one, or one each.
  EXPECT_EQ(Make(SentencePieceStyle(false, true)).Encode("çç"), (Ids{259, 0}));
  EXPECT_EQ(Make(SentencePieceStyle(false, false)).Encode("çç"), (Ids{259, 0, 0}));
}

TEST(TokenizerTest, MetaspacePrependSchemesAndSplit) {
  auto with = [](const char* scheme, bool split) {
    nlohmann::json j = SentencePieceStyle();
    j["normalizer"] = nullptr;
    j["pre_tokenizer"] = {
        {"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", scheme}, {"split", split}};
    j["decoder"] = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", scheme}};
    return Make(j);
  };
  // "first": only the stretch that starts the text gets a "▁".
  EXPECT_EQ(with("first", false).Encode("a<s>a"), (Ids{262, 1, 260}));
  EXPECT_EQ(with("always", false).Encode("a<s>a"), (Ids{262, 1, 262}));
  EXPECT_EQ(with("never", false).Encode("a<s>a"), (Ids{260, 1, 260}));
  // split: pieces start at each "▁" (MergedWithNext), so "▁" and "▁b" cannot merge across.
  EXPECT_EQ(with("always", true).Encode("a  b"), (Ids{262, 259, 259, 261}));
  EXPECT_EQ(with("always", true).Encode("ab ab"), (Ids{264, 264}));
  // The decoder turns "▁" into spaces and drops the one it prepended to the first token.
  EXPECT_EQ(with("first", false).Decode({262, 1, 260}), "a<s>a");
  EXPECT_EQ(with("never", false).Decode({262}), " a");
}

TEST(TokenizerTest, UnicodeNormalForms) {
  // Byte ids: no merges, so a text's ids are its bytes after normalization.
  auto ids = [](const char* form, const std::string& text) {
    nlohmann::json j = HandMade({}, {}, kByteLevel);
    j["normalizer"] = {{"type", form}};
    return Make(j).Encode(text);
  };
  EXPECT_EQ(ids("NFC", "e\u0301"), Bytes("\u00e9"));  // composed
  EXPECT_EQ(ids("NFD", "\u00e9"), Bytes("e\u0301"));  // decomposed
  EXPECT_EQ(ids("NFC", "\uFB01"), Bytes("\uFB01"));   // ﬁ kept by the canonical forms
  EXPECT_EQ(ids("NFKC", "\uFB01"), Bytes("fi"));      // and split by the compatibility ones
  EXPECT_EQ(ids("NFKD", "\u00e9\uFF21"), Bytes("e\u0301A"));
  EXPECT_EQ(ids("NFC", "\u212B"), Bytes("\u00C5"));        // Angstrom sign → Å
  EXPECT_EQ(ids("NFC", "\u1100\u1161"), Bytes("\uAC00"));  // Hangul jamo → 가
}

// Split's five behaviours on "a-b--c" with merges "a -", "- -", "- b" (ids 256, 257, 258): only
// pieces that keep a pair together can merge it.
TEST(TokenizerTest, SplitBehaviours) {
  auto ids = [](const char* behavior, bool invert) {
    const nlohmann::json pre = {
        {"type", "Sequence"},
        {"pretokenizers",
         {{{"type", "Split"},
           {"pattern", {{"String", "-"}}},
           {"behavior", behavior},
           {"invert", invert}},
          {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", false}}}}};
    return Make(HandMade({"a-", "--", "-b"}, {"a -", "- -", "- b"}, pre)).Encode("a-b--c");
  };
  EXPECT_EQ(ids("Isolated", false), (Ids{'a', '-', 'b', '-', '-', 'c'}));
  EXPECT_EQ(ids("Removed", false), (Ids{'a', 'b', 'c'}));
  EXPECT_EQ(ids("MergedWithPrevious", false), (Ids{256, 'b', '-', '-', 'c'}));  // a- b- - c
  EXPECT_EQ(ids("MergedWithNext", false), (Ids{'a', 258, '-', '-', 'c'}));      // a -b - -c
  EXPECT_EQ(ids("Contiguous", false), (Ids{'a', '-', 'b', 257, 'c'}));          // a - b -- c
  EXPECT_EQ(ids("Removed", true), (Ids{'-', '-', '-'}));  // invert: the dashes are kept
}

TEST(TokenizerTest, AddedTokenRules) {
  nlohmann::json j = HandMade({}, {}, kByteLevel);
  j["added_tokens"].push_back(
      {{"id", 302}, {"content", "<x>"}, {"lstrip", true}, {"rstrip", true}, {"special", true}});
  j["added_tokens"].push_back({{"id", 303}, {"content", "ab"}, {"single_word", true}});
  j["added_tokens"].push_back({{"id", 304}, {"content", "q1"}, {"normalized", true}});
  j["added_tokens"].push_back({{"id", 305}, {"content", "r1"}, {"normalized", false}});
  j["normalizer"] = {{"type", "Replace"}, {"pattern", {{"Regex", "[qr]"}}}, {"content", "z"}};
  const Tokenizer t = Make(j);
  EXPECT_EQ(t.Encode("a <x>\tb"), (Ids{'a', 302, 'b'}));  // the whitespace around goes with it
  // single_word: "ab" alone is the token, inside "cab" it is not.
  EXPECT_EQ(t.Encode("ab cab"), (Ids{303, ' ', 'c', 'a', 'b'}));
  // A normalized token is matched after normalization (its content normalized too: "z1"), a
  // non-normalized one in the raw text.
  EXPECT_EQ(t.Encode("q1"), (Ids{304}));
  EXPECT_EQ(t.Encode("z1"), (Ids{304}));
  EXPECT_EQ(t.Encode("r1"), (Ids{305}));
  EXPECT_EQ(t.Encode("<|im_start|>r1"), (Ids{300, 305}));
}

TEST(TokenizerTest, PostProcessorAndTokenizerConfig) {
  nlohmann::json j = SentencePieceStyle();
  j["post_processor"]["single"].push_back({{"SpecialToken", {{"id", "</s>"}}}});
  j["post_processor"]["special_tokens"]["</s>"] = {{"id", "</s>"}, {"ids", {2}}};
  EXPECT_EQ(Make(j).Encode("a", true), (Ids{1, 262, 2}));
  EXPECT_EQ(Make(j).Encode("a"), (Ids{262}));
  // transformers' Llama classes rebuild the template from add_bos_token / add_eos_token.
  const nlohmann::json llama = {{"tokenizer_class", "LlamaTokenizerFast"},
                                {"add_bos_token", false},
                                {"add_eos_token", true},
                                {"bos_token", "<s>"},
                                {"eos_token", {{"content", "</s>"}}}};
  auto rebuilt = Tokenizer::Parse(j, "t", llama);
  ASSERT_TRUE(rebuilt.ok()) << rebuilt.status();
  EXPECT_EQ(rebuilt->Encode("a", true), (Ids{262, 2}));
  EXPECT_EQ(rebuilt->bos_id(), -1);
  // Another class keeps tokenizer.json's template.
  auto kept = Tokenizer::Parse(j, "t", {{"tokenizer_class", "PreTrainedTokenizerFast"}});
  EXPECT_EQ(kept->Encode("a", true), (Ids{1, 262, 2}));
  // Bert's and Roberta's processors: cls first, sep last.
  j["post_processor"] = {{"type", "RobertaProcessing"}, {"cls", {"<s>", 1}}, {"sep", {"</s>", 2}}};
  EXPECT_EQ(Make(j).Encode("a", true), (Ids{1, 262, 2}));
}

// Ill-formed UTF-8: each maximal subpart of a sequence becomes one U+FFFD (Unicode §3.9).
TEST(TokenizerTest, Utf8LossyReplacesMaximalSubparts) {
  const std::string fffd = "\xEF\xBF\xBD";
  EXPECT_EQ(Utf8Lossy("\xC3"), fffd);
  EXPECT_EQ(Utf8Lossy("a\xE2\x82"), "a" + fffd);             // a truncated 3-byte sequence: one
  EXPECT_EQ(Utf8Lossy("\xF0\x9F\x98z"), fffd + "z");         // a truncated 4-byte sequence: one
  EXPECT_EQ(Utf8Lossy("\xED\xA0\x80"), fffd + fffd + fffd);  // a surrogate: ED, A0, 80
  EXPECT_EQ(Utf8Lossy("\xC0\xAF\xFF"), fffd + fffd + fffd);  // overlong, and never-valid bytes
  EXPECT_EQ(Utf8Lossy("é🙂"), "é🙂");
  // Encode reads such text the same way.
  const Tokenizer t = Make(HandMade({}, {}, kByteLevel));
  EXPECT_EQ(t.Encode("a\xC3"), t.Encode("a" + fffd));
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
