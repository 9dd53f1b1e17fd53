#include "common/llm/tokenizer.h"

#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <functional>
#include <map>
#include <optional>
#include <queue>
#include <set>

#include "absl/status/status.h"
#include "common/base/pcre.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

// GPT-2's pre-tokenizer (the ByteLevel pre-tokenizer's use_regex).
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string Utf8(uint32_t cp) {
  std::array<utf8proc_uint8_t, 4> buf{};
  const auto n = utf8proc_encode_char(static_cast<utf8proc_int32_t>(cp), buf.data());
  return std::string(reinterpret_cast<const char*>(buf.data()), static_cast<size_t>(n));
}

// GPT-2's bytes_to_unicode(): printable bytes stand for themselves, the others are shifted to
// U+0100 and up, in byte order.
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

// The length of the UTF-8 sequence a (valid) lead byte starts.
size_t Utf8Length(unsigned char lead) {
  return lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : 4;
}

// The code point at s[i] of valid UTF-8.
int32_t CodePointAt(std::string_view s, size_t i) {
  utf8proc_int32_t cp = -1;
  utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + i),
                   static_cast<utf8proc_ssize_t>(s.size() - i), &cp);
  return cp;
}

// Rust's char::is_whitespace: the White_Space property.
bool IsWhitespace(int32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

// The added-token rule's word character: alphanumeric or '_'.
bool IsWordChar(int32_t cp) {
  if (cp == '_') return true;
  const utf8proc_category_t cat = utf8proc_category(cp);
  return (cat >= UTF8PROC_CATEGORY_LU && cat <= UTF8PROC_CATEGORY_LO) ||
         (cat >= UTF8PROC_CATEGORY_ND && cat <= UTF8PROC_CATEGORY_NO);
}

// Where the character ending at s[..end) of valid UTF-8 starts.
size_t PrevCharStart(std::string_view s, size_t end) {
  size_t i = end - 1;
  while (i > 0 && (static_cast<unsigned char>(s[i]) & 0xC0) == 0x80) --i;
  return i;
}

// Replaces every `from` in `text` by `to`, left to right.
void ReplaceLiteral(std::string& text, std::string_view from, std::string_view to) {
  for (size_t at = text.find(from); at != std::string::npos; at = text.find(from, at + to.size()))
    text.replace(at, from.size(), to);
}

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

// A tokenizer.json pattern: literal, or a regex with Unicode properties (as the crate's onig).
absl::StatusOr<Pcre> Compile(const std::string& pattern, bool literal, const std::string& origin) {
  return CompilePcre(pattern, literal ? PCRE2_LITERAL : PCRE2_UCP, /*jit=*/true,
                     StrCat(origin, ": pattern"));
}

// tokenizers' pattern {"String": s} (matched literally) or {"Regex": r}.
absl::StatusOr<Pcre> CompilePattern(const nlohmann::json& pattern, const std::string& origin) {
  const bool literal =
      pattern.is_object() && pattern.contains("String") && pattern["String"].is_string();
  if (!literal &&
      !(pattern.is_object() && pattern.contains("Regex") && pattern["Regex"].is_string()))
    return absl::InvalidArgumentError(
        StrCat(origin, ": pattern ", pattern.dump(), " is neither {\"String\"} nor {\"Regex\"}"));
  return Compile(pattern[literal ? "String" : "Regex"].get<std::string>(), literal, origin);
}

// A stretch [begin, end) of a text; `flag` says whether a pattern matched it (or, after a
// split's behaviour, whether it is removed).
struct Stretch {
  size_t begin, end;
  bool flag;
};

// The matches of `re` in `text`, as the crate's Pattern::find_matches lists them: every stretch,
// flagged whether it matched. Empty matches are kept (they split the text) but step one character.
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

// A stretch of text on its way to the model; `at_start` when it begins the encoded text (what
// Metaspace's prepend_scheme "first" asks).
struct Piece {
  std::string text;
  bool at_start;
};

enum class Behavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

// The crate's NormalizedString::split: pieces of `piece` by the matches of `re`.
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

// A type's steps: a Sequence's list under `list_key`, or the object itself.
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

// One-character strings of a config ("▁").
absl::StatusOr<std::string> OneChar(const nlohmann::json& j, const char* key, const char* fallback,
                                    const std::string& origin) {
  const std::string s =
      j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : fallback;
  if (s.empty() || Utf8Length(s[0]) != s.size())
    return absl::InvalidArgumentError(
        StrCat(origin, ": ", TypeOf(j), ".", key, " must be one character, got \"", s, "\""));
  return s;
}

}  // namespace

const std::string& ByteToUnicode(uint8_t byte) { return ByteTable()[byte]; }

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

// Normalizer, pre-tokenizer and decoder chains.
struct TokenizerPipeline {
  struct Normalize {
    int form = 0;  // utf8proc options for NFC etc.; 0 for the string steps
    std::optional<Pcre> pattern;
    std::string content;  // Replace's replacement, Prepend's prefix
  };
  struct PreTokenize {
    enum class Kind { kSplit, kByteLevel, kMetaspace } kind;
    std::optional<Pcre> re;  // Split's pattern; ByteLevel's GPT-2 regex when use_regex
    Behavior behavior = Behavior::kIsolated;
    bool invert = false;
    bool add_prefix_space = false;  // ByteLevel
    std::string replacement;        // Metaspace
    enum class Prepend { kAlways, kFirst, kNever } prepend = Prepend::kAlways;
    bool split = true;  // Metaspace
  };
  struct Decode {
    enum class Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
    std::optional<Pcre> pattern;
    std::string content;  // Replace's replacement; Strip's character; Metaspace's replacement
    int start = 0, stop = 0;
    bool prepend = true;  // Metaspace: strip the space it prepended to the first token
  };
  std::vector<Normalize> normalizers;
  std::vector<PreTokenize> pre_tokenizers;
  std::vector<Decode> decoders;
  bool has_decoder = false;
  bool byte_level = false;

  void ApplyNormalizers(std::string& text) const {
    for (const Normalize& n : normalizers) {
      if (n.form != 0) {
        utf8proc_uint8_t* mapped = nullptr;
        const utf8proc_ssize_t len =
            utf8proc_map(reinterpret_cast<const utf8proc_uint8_t*>(text.data()),
                         static_cast<utf8proc_ssize_t>(text.size()), &mapped,
                         static_cast<utf8proc_option_t>(n.form));
        if (len >= 0) text.assign(reinterpret_cast<const char*>(mapped), static_cast<size_t>(len));
        std::free(mapped);
      } else if (n.pattern) {
        ReplaceAll(*n.pattern, n.content, text);
      } else if (!text.empty()) {
        text = n.content + text;  // Prepend, to a non-empty string only
      }
    }
  }

  std::vector<Piece> ApplyPreTokenizers(std::string_view text, bool at_start) const {
    std::vector<Piece> pieces{{std::string(text), at_start}};
    for (const PreTokenize& step : pre_tokenizers) {
      std::vector<Piece> next;
      for (Piece& piece : pieces) {
        switch (step.kind) {
          case PreTokenize::Kind::kSplit:
            SplitPiece(piece, *step.re, step.behavior, step.invert, next);
            break;
          case PreTokenize::Kind::kByteLevel: {
            if (step.add_prefix_space && !piece.text.starts_with(' ')) piece.text.insert(0, " ");
            std::vector<Piece> words;
            if (step.re)
              SplitPiece(piece, *step.re, Behavior::kIsolated, false, words);
            else
              words.push_back(std::move(piece));
            for (Piece& w : words) {
              std::string mapped;
              for (unsigned char b : w.text) mapped += ByteTable()[b];
              next.push_back({std::move(mapped), w.at_start});
            }
            break;
          }
          case PreTokenize::Kind::kMetaspace: {
            std::string& t = piece.text;
            ReplaceLiteral(t, " ", step.replacement);
            const bool prepend = step.prepend == PreTokenize::Prepend::kAlways ||
                                 (step.prepend == PreTokenize::Prepend::kFirst && piece.at_start);
            if (prepend && !t.starts_with(step.replacement)) t.insert(0, step.replacement);
            if (step.split)
              SplitPiece(piece, *step.re, Behavior::kMergedWithNext, false, next);
            else if (!t.empty())
              next.push_back(std::move(piece));
            break;
          }
        }
      }
      pieces = std::move(next);
    }
    return pieces;
  }

  std::string ApplyDecoders(std::vector<std::string> tokens) const {
    if (!has_decoder) return Join(tokens, " ");
    for (const Decode& d : decoders) {
      switch (d.kind) {
        case Decode::Kind::kByteLevel: {
          // Byte symbols back to bytes; a token with another character goes as its UTF-8.
          std::string bytes;
          for (const std::string& token : tokens) {
            std::string mapped;
            bool ok = true;
            for (size_t at = 0; at < token.size() && ok; at += Utf8Length(token[at])) {
              auto it = UnicodeToByte().find(token.substr(at, Utf8Length(token[at])));
              ok = it != UnicodeToByte().end();
              if (ok) mapped += static_cast<char>(it->second);
            }
            bytes += ok ? mapped : token;
          }
          tokens = {Utf8Lossy(bytes)};
          break;
        }
        case Decode::Kind::kReplace:
          for (std::string& t : tokens) ReplaceAll(*d.pattern, d.content, t);
          break;
        case Decode::Kind::kByteFallback: {
          // Runs of <0xNN> tokens become their bytes: one string if they are UTF-8, else one
          // U+FFFD per byte.
          std::vector<std::string> out;
          std::string run;
          size_t run_tokens = 0;
          auto flush = [&] {
            if (run_tokens == 0) return;
            if (IsUtf8(run)) {
              out.push_back(run);
            } else {
              for (size_t i = 0; i < run_tokens; ++i) out.push_back("\xEF\xBF\xBD");
            }
            run.clear();
            run_tokens = 0;
          };
          for (std::string& t : tokens) {
            const bool byte = t.size() == 6 && t.starts_with("<0x") && t.back() == '>' &&
                              std::isxdigit(static_cast<unsigned char>(t[3])) &&
                              std::isxdigit(static_cast<unsigned char>(t[4]));
            if (byte) {
              run += static_cast<char>(std::stoi(t.substr(3, 2), nullptr, 16));
              ++run_tokens;
            } else {
              flush();
              out.push_back(std::move(t));
            }
          }
          flush();
          tokens = std::move(out);
          break;
        }
        case Decode::Kind::kFuse:
          tokens = {Join(tokens, "")};
          break;
        case Decode::Kind::kStrip:
          for (std::string& t : tokens) {
            for (int i = 0; i < d.start && t.starts_with(d.content); ++i)
              t.erase(0, d.content.size());
            for (int i = 0; i < d.stop && t.ends_with(d.content); ++i)
              t.erase(t.size() - d.content.size());
          }
          break;
        case Decode::Kind::kMetaspace:
          for (size_t i = 0; i < tokens.size(); ++i) {
            std::string& t = tokens[i];
            ReplaceLiteral(t, d.content, " ");
            if (i == 0 && d.prepend && t.starts_with(' ')) t.erase(0, 1);
          }
          break;
      }
    }
    return Join(tokens, "");
  }
};

Tokenizer::Tokenizer() : pipeline_(std::make_unique<TokenizerPipeline>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

namespace {

absl::StatusOr<nlohmann::json> ReadJson(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(StrCat("cannot read ", path.string()));
  nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded())
    return absl::InvalidArgumentError(StrCat(path.string(), ": not valid JSON"));
  return json;
}

}  // namespace

absl::StatusOr<TokenizerFiles> ReadTokenizerFiles(const std::filesystem::path& dir) {
  if (!std::filesystem::exists(dir / kTokenizerFile))
    return absl::NotFoundError(StrCat("cannot read ", (dir / kTokenizerFile).string(),
                                      " (the model directory needs a tokenizer.json)"));
  TokenizerFiles files;
  ASSIGN_OR_RETURN(files.tokenizer, ReadJson(dir / kTokenizerFile));
  if (std::filesystem::exists(dir / kTokenizerConfigFile)) {
    ASSIGN_OR_RETURN(files.config, ReadJson(dir / kTokenizerConfigFile));
  }
  return files;
}

absl::StatusOr<Tokenizer> Tokenizer::Read(const std::filesystem::path& dir) {
  ASSIGN_OR_RETURN(const TokenizerFiles files, ReadTokenizerFiles(dir));
  return Parse(files.tokenizer, (dir / kTokenizerFile).string(), files.config);
}

absl::StatusOr<Tokenizer> Tokenizer::Parse(const nlohmann::json& json, const std::string& origin,
                                           const nlohmann::json& config) {
  try {
    return ParseUnguarded(json, origin, config);
  } catch (const nlohmann::json::exception& e) {  // a field of another type than the format's
    return absl::InvalidArgumentError(
        StrCat(origin, ": not a tokenizer.json fedlora can read: ", e.what()));
  }
}

absl::StatusOr<Tokenizer> Tokenizer::ParseUnguarded(const nlohmann::json& json,
                                                    const std::string& origin,
                                                    const nlohmann::json& config) {
  auto refuse = [&](const std::string& what) {
    return absl::InvalidArgumentError(
        StrCat(origin, ": ", what, "; fedlora reads BPE tokenizers (Llama 2/3, Mistral, Qwen, ",
               "Gemma, DeepSeek, GPT-2 style)"));
  };
  if (!json.is_object() || !json.contains("model") || !json["model"].is_object())
    return refuse("no \"model\" object");
  const nlohmann::json& model = json["model"];
  if (model.value("type", std::string("BPE")) != "BPE")
    return refuse(StrCat("model type ", model["type"].dump(), " is not supported"));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() && model[key] != "")
      return refuse(StrCat("BPE ", key, " is set"));
  if (model.contains("dropout") && model["dropout"].is_number() && model["dropout"] != 0)
    return refuse("BPE dropout is set (encoding would be random)");
  if (!model.contains("vocab") || !model["vocab"].is_object()) return refuse("no vocab object");

  Tokenizer t;
  TokenizerPipeline& pipe = *t.pipeline_;
  auto flag = [](const nlohmann::json& j, const char* key, bool fallback) {
    return j.contains(key) && j[key].is_boolean() ? j[key].get<bool>() : fallback;
  };
  t.ignore_merges_ = flag(model, "ignore_merges", false);
  t.byte_fallback_ = flag(model, "byte_fallback", false);
  t.fuse_unk_ = flag(model, "fuse_unk", false);
  int32_t max_id = -1;
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (1 << 24))
      return refuse(StrCat("vocab entry \"", token, "\" has id ", id.dump()));
    t.vocab_[token] = id.get<int32_t>();
    max_id = std::max(max_id, id.get<int32_t>());
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto unk = t.vocab_.find(model["unk_token"].get<std::string>());
    if (unk == t.vocab_.end())
      return refuse(StrCat("unk_token ", model["unk_token"].dump(), " is not in the vocab"));
    t.unk_id_ = unk->second;
  }

  // Normalizers.
  std::vector<std::string> names;
  for (const nlohmann::json& n : Steps(json.value("normalizer", nlohmann::json()), "normalizers")) {
    const std::string type = TypeOf(n);
    TokenizerPipeline::Normalize step;
    if (type == "NFC" || type == "NFD" || type == "NFKC" || type == "NFKD") {
      step.form = UTF8PROC_STABLE |
                  (type[type.size() - 1] == 'C' ? UTF8PROC_COMPOSE : UTF8PROC_DECOMPOSE) |
                  (type.size() == 4 ? UTF8PROC_COMPAT : 0);
    } else if (type == "Replace") {
      ASSIGN_OR_RETURN(step.pattern, CompilePattern(n.value("pattern", nlohmann::json()), origin));
      step.content = n.value("content", std::string());
    } else if (type == "Prepend") {
      step.content = n.value("prepend", std::string());
    } else {
      return refuse(StrCat("normalizer ", type, " is not supported"));
    }
    names.push_back(type);
    pipe.normalizers.push_back(std::move(step));
  }
  const std::string normalizer_names = Join(names, ", ");

  // Pre-tokenizers.
  names.clear();
  for (const nlohmann::json& p :
       Steps(json.value("pre_tokenizer", nlohmann::json()), "pretokenizers")) {
    const std::string type = TypeOf(p);
    using Kind = TokenizerPipeline::PreTokenize::Kind;
    TokenizerPipeline::PreTokenize step{Kind::kSplit};
    if (type == "ByteLevel") {
      step.kind = Kind::kByteLevel;
      step.add_prefix_space = flag(p, "add_prefix_space", false);
      if (flag(p, "use_regex", true)) {
        ASSIGN_OR_RETURN(step.re, Compile(kGpt2Pattern, false, origin));
      }
      pipe.byte_level = true;
    } else if (type == "Digits") {
      ASSIGN_OR_RETURN(step.re, Compile(R"(\p{N})", false, origin));
      step.behavior =
          flag(p, "individual_digits", false) ? Behavior::kIsolated : Behavior::kContiguous;
    } else if (type == "Split") {
      ASSIGN_OR_RETURN(step.re, CompilePattern(p.value("pattern", nlohmann::json()), origin));
      step.invert = flag(p, "invert", false);
      static const std::map<std::string, Behavior> kBehaviors = {
          {"Removed", Behavior::kRemoved},
          {"Isolated", Behavior::kIsolated},
          {"MergedWithPrevious", Behavior::kMergedWithPrevious},
          {"MergedWithNext", Behavior::kMergedWithNext},
          {"Contiguous", Behavior::kContiguous}};
      auto behavior = kBehaviors.find(p.value("behavior", std::string("Isolated")));
      if (behavior == kBehaviors.end())
        return refuse(StrCat("Split behavior ", p["behavior"].dump(), " is not supported"));
      step.behavior = behavior->second;
    } else if (type == "Metaspace") {
      step.kind = Kind::kMetaspace;
      ASSIGN_OR_RETURN(step.replacement, OneChar(p, "replacement", "\u2581", origin));
      ASSIGN_OR_RETURN(step.re, Compile(step.replacement, true, origin));
      step.split = flag(p, "split", true);
      // prepend_scheme, or the older add_prefix_space (true: always).
      const std::string scheme = p.value(
          "prepend_scheme", std::string(flag(p, "add_prefix_space", true) ? "always" : "never"));
      using Prepend = TokenizerPipeline::PreTokenize::Prepend;
      if (scheme != "always" && scheme != "first" && scheme != "never")
        return refuse(StrCat("Metaspace prepend_scheme \"", scheme, "\""));
      step.prepend = scheme == "always"  ? Prepend::kAlways
                     : scheme == "first" ? Prepend::kFirst
                                         : Prepend::kNever;
    } else {
      return refuse(StrCat("pre-tokenizer ", type, " is not supported"));
    }
    names.push_back(type);
    pipe.pre_tokenizers.push_back(std::move(step));
  }
  const std::string pre_tokenizer_names = Join(names, ", ");
  if (pipe.byte_level)
    for (int b = 0; b < 256; ++b)
      if (!t.vocab_.contains(ByteToUnicode(static_cast<uint8_t>(b))))
        return refuse(StrCat("vocab lacks the byte-level symbol of byte ", b,
                             " (a ByteLevel pre-tokenizer needs all 256)"));

  // Decoders.
  names.clear();
  pipe.has_decoder = json.contains("decoder") && !json["decoder"].is_null();
  for (const nlohmann::json& d : Steps(json.value("decoder", nlohmann::json()), "decoders")) {
    const std::string type = TypeOf(d);
    using Kind = TokenizerPipeline::Decode::Kind;
    TokenizerPipeline::Decode step{Kind::kFuse};
    if (type == "ByteLevel") {
      step.kind = Kind::kByteLevel;
    } else if (type == "Replace") {
      step.kind = Kind::kReplace;
      ASSIGN_OR_RETURN(step.pattern, CompilePattern(d.value("pattern", nlohmann::json()), origin));
      step.content = d.value("content", std::string());
    } else if (type == "ByteFallback") {
      step.kind = Kind::kByteFallback;
    } else if (type == "Fuse") {
      step.kind = Kind::kFuse;
    } else if (type == "Strip") {
      step.kind = Kind::kStrip;
      ASSIGN_OR_RETURN(step.content, OneChar(d, "content", " ", origin));
      step.start = d.value("start", 0);
      step.stop = d.value("stop", 0);
    } else if (type == "Metaspace") {
      step.kind = Kind::kMetaspace;
      ASSIGN_OR_RETURN(step.content, OneChar(d, "replacement", "\u2581", origin));
      step.prepend =
          d.value("prepend_scheme",
                  std::string(flag(d, "add_prefix_space", true) ? "always" : "never")) != "never";
    } else {
      return refuse(StrCat("decoder ", type, " is not supported"));
    }
    names.push_back(type);
    pipe.decoders.push_back(std::move(step));
  }
  const std::string decoder_names = Join(names, ", ");

  // Added tokens; the normalized ones are matched in normalized text, so in normalized form.
  if (json.contains("added_tokens") && json["added_tokens"].is_array()) {
    for (const nlohmann::json& a : json["added_tokens"]) {
      if (!a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
          a["id"].get<int64_t>() >= (1 << 24) || !a.contains("content") ||
          !a["content"].is_string() || a["content"].get<std::string>().empty())
        return refuse(StrCat("added token ", a.dump(), " needs an id and content"));
      AddedToken added{a["content"],
                       a["id"],
                       flag(a, "special", false),
                       flag(a, "lstrip", false),
                       flag(a, "rstrip", false),
                       flag(a, "single_word", false),
                       flag(a, "normalized", !flag(a, "special", false))};
      if (added.normalized) pipe.ApplyNormalizers(added.content);
      max_id = std::max(max_id, added.id);
      t.added_.push_back(std::move(added));
    }
  }
  std::stable_sort(t.added_.begin(), t.added_.end(), [](const auto& a, const auto& b) {
    return a.content.size() > b.content.size();
  });
  for (size_t k = 0; k < t.added_.size(); ++k) {
    const AddedToken& a = t.added_[k];
    t.added_by_byte_[a.normalized][static_cast<unsigned char>(a.content[0])].push_back(
        static_cast<int32_t>(k));
  }
  t.id_to_token_.assign(static_cast<size_t>(max_id) + 1, std::string());
  t.is_special_.assign(t.id_to_token_.size(), false);
  for (const auto& [token, id] : t.vocab_) t.id_to_token_[id] = token;
  for (const nlohmann::json& a : json.value("added_tokens", nlohmann::json::array())) {
    t.id_to_token_[a["id"].get<int32_t>()] = a["content"].get<std::string>();
    t.is_special_[a["id"].get<int32_t>()] = flag(a, "special", false);
  }

  if (model.contains("merges") && model["merges"].is_array()) {
    int32_t rank = 0;
    for (const nlohmann::json& m : model["merges"]) {
      std::string left, right;
      if (m.is_string()) {
        const std::string s = m;
        const size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
          return refuse(StrCat("merge ", m.dump(), " is not \"left right\""));
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0];
        right = m[1];
      } else {
        return refuse(StrCat("merge ", m.dump(), " is neither \"a b\" nor [\"a\", \"b\"]"));
      }
      auto l = t.vocab_.find(left), r = t.vocab_.find(right), merged = t.vocab_.find(left + right);
      if (l == t.vocab_.end() || r == t.vocab_.end() || merged == t.vocab_.end())
        return refuse(StrCat("merge ", m.dump(), " uses or makes a token not in the vocab"));
      t.merges_.emplace(PairKey(l->second, r->second), std::pair{rank++, merged->second});
    }
  }

  // The post-processor's tokens around a single sequence.
  auto special_ids = [&](const nlohmann::json& ids, std::vector<int32_t>& out) -> absl::Status {
    for (const nlohmann::json& id : ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > max_id)
        return refuse(StrCat("post-processor adds token id ", id.dump()));
      out.push_back(id.get<int32_t>());
    }
    return absl::OkStatus();
  };
  names.clear();
  for (const nlohmann::json& p :
       Steps(json.value("post_processor", nlohmann::json()), "processors")) {
    const std::string type = TypeOf(p);
    names.push_back(type);
    if (type == "ByteLevel") continue;
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      for (const char* key : {"cls", "sep"})
        if (!p.contains(key) || !p[key].is_array() || p[key].size() != 2)
          return refuse(StrCat(type, " needs \"", key, "\": [token, id]"));
      RETURN_IF_ERROR(special_ids(nlohmann::json::array({p["cls"][1]}), t.prefix_));
      RETURN_IF_ERROR(special_ids(nlohmann::json::array({p["sep"][1]}), t.suffix_));
      continue;
    }
    if (type != "TemplateProcessing" || !p.contains("single") || !p["single"].is_array())
      return refuse(StrCat("post-processor ", type, " is not supported"));
    bool after = false;
    for (const nlohmann::json& item : p["single"]) {
      if (item.contains("Sequence")) {
        after = true;
        continue;
      }
      // The item's ids from the template's special_tokens, or else the token of that name.
      const std::string id =
          item.contains("SpecialToken") ? item["SpecialToken"].value("id", std::string()) : "";
      const nlohmann::json specials = p.value("special_tokens", nlohmann::json::object());
      nlohmann::json ids = specials.contains(id) && specials[id].contains("ids")
                               ? specials[id]["ids"]
                               : nlohmann::json::array({t.TokenId(id)});
      RETURN_IF_ERROR(special_ids(ids, after ? t.suffix_ : t.prefix_));
    }
  }
  const std::string post_names = Join(names, ", ");

  // transformers' Llama and Gemma classes rebuild the template from tokenizer_config.json.
  static const std::set<std::string> kRebuilding = {"LlamaTokenizer",     "LlamaTokenizerFast",
                                                    "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
                                                    "GemmaTokenizer",     "GemmaTokenizerFast"};
  if (config.is_object() && kRebuilding.contains(config.value("tokenizer_class", std::string()))) {
    auto token = [&](const char* key, bool wanted, std::vector<int32_t>& out) -> absl::Status {
      out.clear();
      if (!wanted) return absl::OkStatus();
      const nlohmann::json v = config.value(key, nlohmann::json());
      const std::string content = v.is_string()   ? v.get<std::string>()
                                  : v.is_object() ? v.value("content", std::string())
                                                  : std::string();
      const int32_t id = t.TokenId(content);
      if (id < 0)
        return refuse(StrCat("tokenizer_config.json asks for ", key, " ", v.dump(),
                             ", which is not a token"));
      out.push_back(id);
      return absl::OkStatus();
    };
    RETURN_IF_ERROR(token("bos_token", flag(config, "add_bos_token", true), t.prefix_));
    RETURN_IF_ERROR(token("eos_token", flag(config, "add_eos_token", false), t.suffix_));
  }

  t.description_ =
      StrCat("BPE, ", t.vocab_size(), " tokens (", t.added_.size(), " added), ", t.merges_.size(),
             " merges", t.byte_fallback_ ? ", byte fallback" : "",
             t.unk_id_ >= 0 ? StrCat(", unk ", t.id_to_token_[t.unk_id_]) : "", "; normalizer [",
             normalizer_names, "]; pre-tokenizer [", pre_tokenizer_names, "]; decoder [",
             decoder_names, "]; post-processor [", post_names, "]");
  return t;
}

int32_t Tokenizer::TokenId(std::string_view token) const {
  auto it = vocab_.find(std::string(token));
  if (it != vocab_.end()) return it->second;
  for (size_t id = 0; id < id_to_token_.size(); ++id)  // added tokens, by their written content
    if (id_to_token_[id] == token) return static_cast<int32_t>(id);
  return -1;
}

void Tokenizer::EncodeWord(std::string_view word, std::vector<int32_t>& out) const {
  std::string key(word);
  if (auto cached = cache_.find(key); cached != cache_.end()) {
    out.insert(out.end(), cached->second.begin(), cached->second.end());
    return;
  }
  std::vector<int32_t> symbols;
  if (auto whole = ignore_merges_ ? vocab_.find(key) : vocab_.end(); whole != vocab_.end()) {
    symbols.push_back(whole->second);
  } else {
    // Characters; a missing one becomes its byte tokens, or unk (runs fused), or nothing.
    bool pending_unk = false;
    auto flush_unk = [&] {
      if (pending_unk) symbols.push_back(unk_id_);
      pending_unk = false;
    };
    for (size_t at = 0; at < word.size();) {
      const size_t len = Utf8Length(word[at]);
      const std::string ch(word.substr(at, len));
      at += len;
      if (auto it = vocab_.find(ch); it != vocab_.end()) {
        flush_unk();
        symbols.push_back(it->second);
        continue;
      }
      if (byte_fallback_) {
        std::vector<int32_t> bytes;
        for (unsigned char b : ch) {
          static constexpr char kHex[] = "0123456789ABCDEF";
          auto it = vocab_.find(StrCat("<0x", std::string{kHex[b >> 4], kHex[b & 15]}, ">"));
          if (it == vocab_.end()) break;
          bytes.push_back(it->second);
        }
        if (bytes.size() == ch.size()) {
          flush_unk();
          symbols.insert(symbols.end(), bytes.begin(), bytes.end());
          continue;
        }
      }
      if (unk_id_ >= 0) {
        if (!fuse_unk_) flush_unk();
        pending_unk = true;
      }
    }
    flush_unk();

    // Merges, lowest rank first and leftmost among equals, over a linked list of symbols with a
    // queue of candidate pairs (entries made stale by an earlier merge are skipped).
    struct Candidate {
      int32_t rank, pos, merged;
      bool operator<(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    const int n = static_cast<int>(symbols.size());
    std::vector<int> prev(n), next(n);
    std::vector<bool> alive(n, true);
    for (int i = 0; i < n; ++i) prev[i] = i - 1, next[i] = i + 1 < n ? i + 1 : -1;
    std::priority_queue<Candidate> queue;
    auto push = [&](int pos) {
      if (pos < 0 || next[pos] < 0) return;
      auto m = merges_.find(PairKey(symbols[pos], symbols[next[pos]]));
      if (m != merges_.end()) queue.push({m->second.first, pos, m->second.second});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!queue.empty()) {
      const Candidate top = queue.top();
      queue.pop();
      if (!alive[top.pos] || next[top.pos] < 0) continue;
      const int right = next[top.pos];
      auto m = merges_.find(PairKey(symbols[top.pos], symbols[right]));
      if (m == merges_.end() || m->second.second != top.merged) continue;  // stale
      symbols[top.pos] = top.merged;
      alive[right] = false;
      next[top.pos] = next[right];
      if (next[right] >= 0) prev[next[right]] = top.pos;
      push(prev[top.pos]);
      push(top.pos);
    }
    std::vector<int32_t> merged;
    for (int i = n > 0 ? 0 : -1; i >= 0; i = next[i]) merged.push_back(symbols[i]);
    symbols = std::move(merged);
  }
  if (cache_.size() < (1 << 16)) cache_.emplace(std::move(key), symbols);
  out.insert(out.end(), symbols.begin(), symbols.end());
}

template <typename Rest>
void Tokenizer::SplitAdded(std::string_view text, bool normalized, bool at_start,
                           std::vector<int32_t>& out, Rest&& rest) const {
  auto emit = [&](size_t begin, size_t end) {
    if (end > begin) rest(text.substr(begin, end - begin), at_start && begin == 0);
  };
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (int32_t k : added_by_byte_[normalized][static_cast<unsigned char>(text[i])]) {
      const AddedToken& a = added_[k];  // longest first
      if (text.compare(i, a.content.size(), a.content) != 0) continue;
      const size_t end = i + a.content.size();
      if (a.single_word && ((i > 0 && IsWordChar(CodePointAt(text, PrevCharStart(text, i)))) ||
                            (end < text.size() && IsWordChar(CodePointAt(text, end)))))
        continue;
      hit = &a;
      break;
    }
    if (hit == nullptr) {
      i += Utf8Length(text[i]);
      continue;
    }
    size_t seg_end = i;
    if (hit->lstrip)
      while (seg_end > start && IsWhitespace(CodePointAt(text, PrevCharStart(text, seg_end))))
        seg_end = PrevCharStart(text, seg_end);
    emit(start, seg_end);
    out.push_back(hit->id);
    i += hit->content.size();
    if (hit->rstrip)
      while (i < text.size() && IsWhitespace(CodePointAt(text, i))) i += Utf8Length(text[i]);
    start = i;
  }
  emit(start, text.size());
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special) const {
  std::string valid;  // a copy only when the text is not UTF-8
  if (!IsUtf8(text)) {
    valid = Utf8Lossy(text);
    text = valid;
  }
  std::vector<int32_t> out;
  if (add_special) out = prefix_;
  SplitAdded(text, false, true, out, [&](std::string_view stretch, bool at_start) {
    std::string normalized(stretch);
    pipeline_->ApplyNormalizers(normalized);
    SplitAdded(normalized, true, at_start, out, [&](std::string_view s, bool start) {
      for (const Piece& piece : pipeline_->ApplyPreTokenizers(s, start))
        EncodeWord(piece.text, out);
    });
  });
  if (add_special) out.insert(out.end(), suffix_.begin(), suffix_.end());
  return out;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::vector<std::string> tokens;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    if (skip_special && is_special_[id]) continue;
    tokens.push_back(id_to_token_[id]);
  }
  return pipeline_->ApplyDecoders(std::move(tokens));
}

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
