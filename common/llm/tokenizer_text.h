// What the tokenizer's stages (tokenizer.h) share: UTF-8 walking, GPT-2's byte alphabet,
// tokenizer.json's patterns and their matches, the crate's split behaviours, and the reading of
// tokenizer.json's step lists. Internal to common/llm's tokenizer files.
#ifndef FEDLORA_COMMON_LLM_TOKENIZER_TEXT_H_
#define FEDLORA_COMMON_LLM_TOKENIZER_TEXT_H_

#include <array>
#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/pcre.h"

namespace fedlora::common::tokenizer_text {

// GPT-2's pre-tokenizer (the ByteLevel pre-tokenizer's use_regex).
inline constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// INVALID_ARGUMENT "<origin>: <what>; fedlora reads BPE tokenizers (...)": a tokenizer.json this
// reader does not take.
absl::Status Refuse(const std::string& origin, const std::string& what);

// GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the others are shifted to
// U+0100 and up, in byte order; each UTF-8 encoded.
const std::array<std::string, 256>& ByteTable();
// Its inverse.
const std::map<std::string, uint8_t>& UnicodeToByte();

// The length of the UTF-8 sequence a (valid) lead byte starts.
size_t Utf8Length(unsigned char lead);
// The code point at s[i] of valid UTF-8.
int32_t CodePointAt(std::string_view s, size_t i);
// Rust's char::is_whitespace: the White_Space property.
bool IsWhitespace(int32_t cp);
// The added-token rule's word character: alphanumeric or '_'.
bool IsWordChar(int32_t cp);
// Where the character ending at s[..end) of valid UTF-8 starts.
size_t PrevCharStart(std::string_view s, size_t end);
// Replaces every `from` in `text` by `to`, left to right.
void ReplaceLiteral(std::string& text, std::string_view from, std::string_view to);
std::string Join(const std::vector<std::string>& parts, const char* separator);

// A tokenizer.json pattern: literal, or a regex with Unicode properties (as the crate's onig).
absl::StatusOr<Pcre> Compile(const std::string& pattern, bool literal, const std::string& origin);
// tokenizers' pattern {"String": s} (matched literally) or {"Regex": r}.
absl::StatusOr<Pcre> CompilePattern(const nlohmann::json& pattern, const std::string& origin);

// A stretch [begin, end) of a text; `flag` says whether a pattern matched it (or, after a
// split's behaviour, whether it is removed).
struct Stretch {
  size_t begin, end;
  bool flag;
};
// The matches of `re` in `text`, as the crate's Pattern::find_matches lists them: every stretch,
// flagged whether it matched. Empty matches are kept (they split the text) but step one character.
std::vector<Stretch> FindMatches(const Pcre& re, std::string_view text);
// Every match of `re` in `text` replaced by `content`.
void ReplaceAll(const Pcre& re, const std::string& content, std::string& text);

// A stretch of text on its way to the model; `at_start` when it begins the encoded text (what
// Metaspace's prepend_scheme "first" asks).
struct Piece {
  std::string text;
  bool at_start;
};
enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };
// The crate's NormalizedString::split: pieces of `piece` by the matches of `re`, onto `out`.
void SplitPiece(const Piece& piece, const Pcre& re, Behavior behavior, bool invert,
                std::vector<Piece>& out);

// A type's steps: a Sequence's list under `list_key`, or the object itself (none for null).
std::vector<nlohmann::json> Steps(const nlohmann::json& j, const char* list_key);
// The object's "type", or the whole value printed.
std::string TypeOf(const nlohmann::json& j);
// A JSON flag, or `fallback` when absent or not a boolean.
bool Flag(const nlohmann::json& j, const char* key, bool fallback);
// One-character strings of a config ("▁").
absl::StatusOr<std::string> OneChar(const nlohmann::json& j, const char* key, const char* fallback,
                                    const std::string& origin);

}  // namespace fedlora::common::tokenizer_text

#endif  // FEDLORA_COMMON_LLM_TOKENIZER_TEXT_H_
