#include "common/llm/tokenizer_text.h"

#include <utf8proc.h>

#include <algorithm>

#include "absl/status/status.h"
#include "common/base/strings.h"
#include "common/llm/tokenizer.h"

namespace fedlora::common {
namespace tokenizer_text {

absl::Status Refuse(const std::string& origin, const std::string& what) {
  return absl::InvalidArgumentError(
      StrCat(origin, ": ", what, "; fedlora reads BPE tokenizers (Llama 2/3, Mistral, Qwen, ",
             "Gemma, DeepSeek, GPT-2 style)"));
}

namespace {

std::string Utf8(uint32_t cp) {
  std::array<utf8proc_uint8_t, 4> buf{};
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf.data());
  return std::string(reinterpret_cast<const char*>(buf.data()), static_cast<size_t>(n));
}

}  // namespace

const std::array<std::string, 256>& ByteTable() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    uint32_t shifted = 256;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174;
      t[b] = Utf8(printable ? static_cast<uint32_t>(b) : shifted++);
    }
    return t;
  }();
  return table;
}

const std::map<std::string, uint8_t>& UnicodeToByte() {
  static const std::map<std::string, uint8_t> inverse = [] {
    std::map<std::string, uint8_t> m;
    for (int b = 0; b < 256; ++b) m[ByteTable()[b]] = static_cast<uint8_t>(b);
    return m;
  }();
  return inverse;
}

size_t Utf8Length(unsigned char lead) {
  return lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : 4;
}

int32_t CodePointAt(std::string_view s, size_t i) {
  utf8proc_int32_t cp = -1;
  utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                   static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  return cp;
}

bool IsWhitespace(int32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

bool IsWordChar(int32_t cp) {
  if (cp == '_') return true;
  const utf8proc_category_t cat = utf8proc_category(cp);
  return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
         (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

size_t PrevCharStart(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

void ReplaceLiteral(std::string& text, std::string_view from, std::string_view to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
}

absl::StatusOr<Pcre> Compile(const std::string& pattern, bool literal, const std::string& origin) {
  return CompilePcre(pattern, literal ? PCRE2_LITERAL : PCRE2_UCP, /*jit=*/true,
                     StrCat(origin, ": pattern"));
}

absl::StatusOr<Pcre> CompilePattern(const nlohmann::json& pattern, const std::string& origin) {
  const bool literal =
      pattern.is_object() && pattern.contains("String") && pattern["String"].is_string();
  if (!literal &&
      !(pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()))
    return absl::InvalidArgumentError(
        StrCat(origin, ": pattern ", pattern.dump(), " is neither {\"String\"} nor {\"Regex\"}"));
  return Compile(pattern[literal ? "String" : "Regex"].get<std::string>(), literal, origin);
}

std::vector<Stretch> FindMatches(const Pcre& re, std::string_view text) {
  std::vector<Stretch> out;
  const auto* subject = reinterpret_cast<PCRE2_SPTR>(text.data());
  size_t at = 0, prev = 0;
  while (at <= text.size()) {
    if (pcre2_match(re.code, subject, text.size(), at, PCRE2_NO_UTF_CHECK, re.match, nullptr) < 0)
      break;
    const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(re.match);
    const size_t begin = ov[0], end = ov[1];
    if (prev != begin) out.push_back({prev, begin, false});
    out.push_back({begin, end, true});
    prev = end;
    at = end > begin ? end : end < text.size() ? end + Utf8Length(text[end]) : text.size() + 1;
  }
  if (prev != text.size()) out.push_back({prev, text.size(), false});
  return out;
}

void SplitPiece(const Piece& piece, const Pcre& re, Behavior behavior, bool invert,
                std::vector<Piece>& out) {
  std::vector<Stretch> matches = FindMatches(re, piece.text);
  if (invert)
    for (Stretch& m : matches) m.flag = !m.flag;
  std::vector<Stretch> splits;  // flag: removed
  bool previous_match = false;
  switch (behavior) {
    case Behavior::kRemoved:  // a match is removed
      splits = std::move(matches);
      break;
    case Behavior::kIsolated:
      for (const Stretch& m : matches) splits.push_back({m.begin, m.end, false});
      break;
    case Behavior::kMergedWithPrevious:
      for (const Stretch& m : matches) {
        if (m.flag && !previous_match && !splits.empty())
          splits.back().end = m.end;
        else
          splits.push_back({m.begin, m.end, false});
        previous_match = m.flag;
      }
      break;
    case Behavior::kMergedWithNext:
      for (auto m = matches.rbegin(); m != matches.rend(); ++m) {
        if (m->flag && !previous_match && !splits.empty())
          splits.back().begin = m->begin;
        else
          splits.push_back({m->begin, m->end, false});
        previous_match = m->flag;
      }
      std::reverse(splits.begin(), splits.end());
      break;
    case Behavior::kContiguous:
      for (const Stretch& m : matches) {
        if (m.flag == previous_match && !splits.empty())
          splits.back().end = m.end;
        else
          splits.push_back({m.begin, m.end, false});
        previous_match = m.flag;
      }
      break;
  }
  for (const Stretch& s : splits)
    if (!s.flag && s.end > s.begin)
      out.push_back({piece.text.substr(s.begin, s.end - s.begin), piece.at_start && s.begin == 0});
}

void ReplaceAll(const Pcre& re, const std::string& content, std::string& text) {
  std::string out;
  for (const Stretch& m : FindMatches(re, text))
    out += m.flag ? std::string_view(content)
                  : std::string_view(text).substr(m.begin, m.end - m.begin);
  text = std::move(out);
}

std::string Join(const std::vector<std::string>& parts, const char* separator) {
  std::string out;
  for (size_t i = 0; i < parts.size(); ++i) out += (i > 0 ? separator : "") + parts[i];
  return out;
}

std::vector<nlohmann::json> Steps(const nlohmann::json& j, const char* list_key) {
  if (j.is_null()) return {};
  if (j.is_object() && j.value("type", std::string()) == "Sequence" && j.contains(list_key) &&
      j[list_key].is_array())
    return j[list_key].get<std::vector<nlohmann::json>>();
  return {j};
}

std::string TypeOf(const nlohmann::json& j) {
  return j.is_object() && j.contains("type") && j["type"].is_string() ? j["type"].get<std::string>()
                                                                      : j.dump();
}

absl::StatusOr<std::string> OneChar(const nlohmann::json& j, const char* key, const char* fallback,
                                    const std::string& origin) {
  const std::string s =
      j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : fallback;
  if (s.empty() || Utf8Length(s[0]) != s.size())
    return absl::InvalidArgumentError(
        StrCat(origin, ": ", TypeOf(j), ".", key, " must be one character, got \"", s, "\""));
  return s;
}

bool Flag(const nlohmann::json& j, const char* key, bool fallback) {
  return j.contains(key) && j[key].is_boolean() ? j[key].get<bool>() : fallback;
}

}  // namespace tokenizer_text

const std::string& ByteToUnicode(uint8_t byte) { return tokenizer_text::ByteTable()[byte]; }

std::string Utf8Lossy(std::string_view b) {
  std::string out;
  out.reserve(b.size());
  size_t i = 0;
  while (i < b.size()) {
    const auto c = static_cast<unsigned char>(b[i]);
    if (c < 0x80) {
      out += static_cast<char>(c);
      ++i;
      continue;
    }
    // Well-formed sequences (Unicode table 3-7): the lead byte fixes the length and the range of
    // the second byte; later bytes are 80..BF.
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF)
      len = 2;
    else if (c >= 0xE0 && c <= 0xEF)
      len = 3, lo = c == 0xE0 ? 0xA0 : 0x80, hi = c == 0xED ? 0x9F : 0xBF;
    else if (c >= 0xF0 && c <= 0xF4)
      len = 4, lo = c == 0xF0 ? 0x90 : 0x80, hi = c == 0xF4 ? 0x8F : 0xBF;
    size_t k = 1;
    while (len > 0 && k < len && i + k < b.size()) {
      const auto d = static_cast<unsigned char>(b[i + k]);
      if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) break;
      ++k;
    }
    if (len > 0 && k == len) {
      out.append(b.substr(i, len));
    } else {
      out += "\xEF\xBF\xBD";  // U+FFFD for the maximal subpart
    }
    i += k;
  }
  return out;
}

}  // namespace fedlora::common
