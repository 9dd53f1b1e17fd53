#include "common/llm/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <map>

#include "absl/status/status.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

// GPT-2's pre-tokenizer (the ByteLevel pre-tokenizer's use_regex).
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

std::string Utf8(uint32_t cp) {
  std::string s;
  if (cp < 0x80) {
    s += static_cast<char>(cp);
  } else if (cp < 0x800) {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
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

size_t Utf8Length(unsigned char lead) {
  return lead < 0x80 ? 1 : (lead >> 5) == 6 ? 2 : (lead >> 4) == 14 ? 3 : 4;
}

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

struct Pcre {
  pcre2_code* code = nullptr;
  Pcre() = default;
  Pcre(Pcre&& o) noexcept : code(std::exchange(o.code, nullptr)) {}
  ~Pcre() {
    if (code != nullptr) pcre2_code_free(code);
  }
};

absl::StatusOr<Pcre> Compile(const std::string& pattern, bool literal, const std::string& origin) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  Pcre re;
  re.code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | PCRE2_UCP | (literal ? PCRE2_LITERAL : 0), &error, &offset,
                          nullptr);
  if (re.code == nullptr) {
    std::array<PCRE2_UCHAR, 256> message{};
    pcre2_get_error_message(error, message.data(), message.size());
    return absl::InvalidArgumentError(StrCat(origin, ": pre-tokenizer pattern ", pattern,
                                             " does not compile at offset ", offset, ": ",
                                             reinterpret_cast<const char*>(message.data())));
  }
  pcre2_jit_compile(re.code, PCRE2_JIT_COMPLETE);  // an optimisation; matching works without it
  return re;
}

}  // namespace

const std::string& ByteToUnicode(uint8_t byte) { return ByteTable()[byte]; }

// The pre-tokenizer: regex splits applied in turn; a match becomes its own piece (Isolated) or is
// dropped (Removed), and the text between matches stays.
struct PreTokenizer {
  struct Step {
    Pcre re;
    bool isolated;
  };
  std::vector<Step> steps;

  // Splits every piece by every step in turn.
  std::vector<std::string_view> Split(std::string_view text) const {
    std::vector<std::string_view> pieces{text};
    for (const Step& step : steps) {
      pcre2_match_data* md = pcre2_match_data_create_from_pattern(step.re.code, nullptr);
      std::vector<std::string_view> next;
      for (std::string_view piece : pieces) {
        const auto* subject = reinterpret_cast<PCRE2_SPTR>(piece.data());
        size_t at = 0, last = 0;  // search position; end of the previous match
        while (at <= piece.size()) {
          const int rc =
              pcre2_match(step.re.code, subject, piece.size(), at, PCRE2_NO_UTF_CHECK, md, nullptr);
          if (rc < 0) break;
          const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
          const size_t begin = ov[0], end = ov[1];
          if (end == begin) {  // empty match: step over one character
            at = begin < piece.size() ? begin + Utf8Length(piece[begin]) : piece.size() + 1;
            continue;
          }
          if (last < begin) next.push_back(piece.substr(last, begin - last));
          if (step.isolated) next.push_back(piece.substr(begin, end - begin));
          last = at = end;
        }
        if (last < piece.size()) next.push_back(piece.substr(last));
      }
      pcre2_match_data_free(md);
      pieces = std::move(next);
    }
    return pieces;
  }
};

Tokenizer::Tokenizer() : pre_tokenizer_(std::make_unique<PreTokenizer>()) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

absl::StatusOr<Tokenizer> Tokenizer::Read(const std::filesystem::path& dir) {
  const std::filesystem::path path = dir / kTokenizerFile;
  std::ifstream in(path);
  if (!in)
    return absl::NotFoundError(
        StrCat("cannot read ", path.string(), " (the model directory needs a tokenizer.json)"));
  nlohmann::json json = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (json.is_discarded())
    return absl::InvalidArgumentError(StrCat(path.string(), ": not valid JSON"));
  return Parse(json, path.string());
}

absl::StatusOr<Tokenizer> Tokenizer::Parse(const nlohmann::json& json, const std::string& origin) {
  auto refuse = [&](const std::string& what) {
    return absl::InvalidArgumentError(StrCat(
        origin, ": ", what, "; fedlora reads byte-level BPE tokenizers (GPT-2, Llama 3, SmolLM2)"));
  };
  if (!json.is_object() || !json.contains("model") || !json["model"].is_object())
    return refuse("no \"model\" object");
  const nlohmann::json& model = json["model"];
  if (model.value("type", std::string("BPE")) != "BPE")
    return refuse(StrCat("model type is ", model["type"].dump()));
  if (json.contains("normalizer") && !json["normalizer"].is_null())
    return refuse(StrCat("normalizer ", json["normalizer"].value("type", std::string("?")),
                         " is not supported (SentencePiece-style tokenizers such as Llama 2's)"));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() && model[key] != "")
      return refuse(StrCat("BPE ", key, " is set"));
  if (!model.contains("vocab") || !model["vocab"].is_object()) return refuse("no vocab object");

  Tokenizer t;
  t.ignore_merges_ = model.value("ignore_merges", false);
  int32_t max_id = -1;
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (1 << 24))
      return refuse(StrCat("vocab entry \"", token, "\" has id ", id.dump()));
    t.vocab_[token] = id.get<int32_t>();
    max_id = std::max(max_id, id.get<int32_t>());
  }
  for (int b = 0; b < 256; ++b)
    if (!t.vocab_.contains(ByteToUnicode(static_cast<uint8_t>(b))))
      return refuse(StrCat("vocab lacks the byte-level symbol of byte ", b,
                           " (not a byte-level vocabulary)"));

  if (json.contains("added_tokens") && json["added_tokens"].is_array()) {
    for (const nlohmann::json& a : json["added_tokens"]) {
      if (!a.contains("id") || !a["id"].is_number_integer() || !a.contains("content") ||
          !a["content"].is_string() || a["content"].get<std::string>().empty())
        return refuse(StrCat("added token ", a.dump(), " needs an integer id and content"));
      AddedToken added{a["content"], a["id"], a.value("special", false), a.value("lstrip", false),
                       a.value("rstrip", false)};
      max_id = std::max(max_id, added.id);
      t.added_.push_back(std::move(added));
    }
  }
  std::stable_sort(t.added_.begin(), t.added_.end(), [](const auto& a, const auto& b) {
    return a.content.size() > b.content.size();
  });
  t.id_to_token_.assign(static_cast<size_t>(max_id) + 1, std::string());
  t.is_special_.assign(t.id_to_token_.size(), false);
  for (const auto& [token, id] : t.vocab_) t.id_to_token_[id] = token;
  for (const AddedToken& a : t.added_) {
    t.id_to_token_[a.id] = a.content;
    t.is_special_[a.id] = a.special;
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

  // Pre-tokenizer steps.
  std::vector<nlohmann::json> steps;
  if (json.contains("pre_tokenizer") && !json["pre_tokenizer"].is_null()) {
    const nlohmann::json& pre = json["pre_tokenizer"];
    if (pre.value("type", std::string()) == "Sequence" && pre.contains("pretokenizers"))
      for (const nlohmann::json& p : pre["pretokenizers"]) steps.push_back(p);
    else
      steps.push_back(pre);
  }
  for (const nlohmann::json& step : steps) {
    const std::string type = step.value("type", std::string());
    if (type == "ByteLevel") {
      t.add_prefix_space_ = step.value("add_prefix_space", false);
      if (step.value("use_regex", true)) {
        auto re = Compile(kGpt2Pattern, false, origin);
        if (!re.ok()) return re.status();
        t.pre_tokenizer_->steps.push_back({std::move(*re), true});
      }
    } else if (type == "Digits") {
      auto re =
          Compile(step.value("individual_digits", false) ? R"(\p{N})" : R"(\p{N}+)", false, origin);
      if (!re.ok()) return re.status();
      t.pre_tokenizer_->steps.push_back({std::move(*re), true});
    } else if (type == "Split") {
      if (step.value("invert", false)) return refuse("Split with invert is not supported");
      const nlohmann::json& pattern = step.value("pattern", nlohmann::json::object());
      const bool literal = pattern.contains("String");
      if (!literal && !pattern.contains("Regex"))
        return refuse(StrCat("Split pattern ", pattern.dump()));
      const std::string behavior = step.value("behavior", std::string("Isolated"));
      if (behavior != "Isolated" && behavior != "Removed")
        return refuse(StrCat("Split behavior ", behavior, " is not supported"));
      auto re = Compile(pattern[literal ? "String" : "Regex"].get<std::string>(), literal, origin);
      if (!re.ok()) return re.status();
      t.pre_tokenizer_->steps.push_back({std::move(*re), behavior == "Isolated"});
    } else {
      return refuse(StrCat("pre-tokenizer ", type, " is not supported"));
    }
  }

  // A template post-processor that starts with a special token: Llama 3's <|begin_of_text|>.
  std::vector<nlohmann::json> processors;
  if (json.contains("post_processor") && json["post_processor"].is_object()) {
    const nlohmann::json& post = json["post_processor"];
    if (post.value("type", std::string()) == "Sequence" && post.contains("processors"))
      for (const nlohmann::json& p : post["processors"]) processors.push_back(p);
    else
      processors.push_back(post);
  }
  for (const nlohmann::json& p : processors) {
    if (p.value("type", std::string()) != "TemplateProcessing" || !p.contains("single") ||
        !p["single"].is_array() || p["single"].empty() || !p["single"][0].contains("SpecialToken"))
      continue;
    const std::string bos = p["single"][0]["SpecialToken"].value("id", std::string());
    t.bos_id_ = t.TokenId(bos);
    if (t.bos_id_ < 0) return refuse(StrCat("post-processor adds unknown token ", bos));
  }
  return t;
}

int32_t Tokenizer::TokenId(std::string_view token) const {
  for (const AddedToken& a : added_)
    if (a.content == token) return a.id;
  auto it = vocab_.find(std::string(token));
  return it == vocab_.end() ? -1 : it->second;
}

void Tokenizer::EncodeWord(std::string_view piece, std::vector<int32_t>& out) const {
  std::string mapped;
  for (unsigned char b : piece) mapped += ByteTable()[b];
  if (auto cached = cache_.find(mapped); cached != cache_.end()) {
    out.insert(out.end(), cached->second.begin(), cached->second.end());
    return;
  }
  std::vector<int32_t> symbols;
  if (auto whole = vocab_.find(mapped); ignore_merges_ && whole != vocab_.end()) {
    symbols.push_back(whole->second);
  } else {
    for (unsigned char b : piece) symbols.push_back(vocab_.at(ByteTable()[b]));
    // Merge the lowest-ranked adjacent pair, leftmost first, until none is in the merge table.
    for (;;) {
      int32_t best_rank = INT32_MAX, merged = -1;
      size_t at = 0;
      for (size_t i = 0; i + 1 < symbols.size(); ++i) {
        auto m = merges_.find(PairKey(symbols[i], symbols[i + 1]));
        if (m != merges_.end() && m->second.first < best_rank) {
          best_rank = m->second.first;
          merged = m->second.second;
          at = i;
        }
      }
      if (merged < 0) break;
      symbols[at] = merged;
      symbols.erase(symbols.begin() + static_cast<ptrdiff_t>(at) + 1);
    }
  }
  if (cache_.size() < (1 << 16)) cache_[mapped] = symbols;
  out.insert(out.end(), symbols.begin(), symbols.end());
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text) const {
  std::vector<int32_t> out;
  auto encode_segment = [&](std::string_view segment) {
    if (segment.empty()) return;
    std::string prefixed;
    if (add_prefix_space_ && segment.front() != ' ') {
      prefixed = " " + std::string(segment);
      segment = prefixed;
    }
    for (std::string_view piece : pre_tokenizer_->Split(segment)) EncodeWord(piece, out);
  };
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  size_t start = 0, i = 0;
  while (i < text.size()) {
    const AddedToken* hit = nullptr;
    for (const AddedToken& a : added_)
      if (text.compare(i, a.content.size(), a.content) == 0) {
        hit = &a;
        break;
      }
    if (hit == nullptr) {
      ++i;
      continue;
    }
    size_t seg_end = i;
    if (hit->lstrip)
      while (seg_end > start && is_space(text[seg_end - 1])) --seg_end;
    encode_segment(text.substr(start, seg_end - start));
    out.push_back(hit->id);
    i += hit->content.size();
    if (hit->rstrip)
      while (i < text.size() && is_space(text[i])) ++i;
    start = i;
  }
  encode_segment(text.substr(start));
  return out;
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, bool skip_special) const {
  std::string out;
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    if (skip_special && is_special_[id]) continue;
    const std::string& token = id_to_token_[id];
    // Byte-level symbols back to bytes; a token with other characters (an added token) as is.
    std::string bytes;
    bool mapped = true;
    for (size_t at = 0; at < token.size() && mapped;) {
      const size_t len = Utf8Length(static_cast<unsigned char>(token[at]));
      auto it = UnicodeToByte().find(token.substr(at, len));
      if (it == UnicodeToByte().end())
        mapped = false;
      else
        bytes += static_cast<char>(it->second);
      at += len;
    }
    out += mapped ? bytes : token;
  }
  return out;
}

nlohmann::json TrainByteLevelTokenizer(const std::vector<std::string>& corpus, int merges,
                                       const std::vector<std::string>& special_tokens) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(ByteToUnicode(static_cast<uint8_t>(b)));

  // Words of the corpus as symbol sequences, with their counts.
  std::map<std::string, int64_t> word_counts;
  {
    PreTokenizer gpt2;
    gpt2.steps.push_back({std::move(*Compile(kGpt2Pattern, false, "gpt2")), true});
    for (const std::string& text : corpus)
      for (std::string_view w : gpt2.Split(text)) ++word_counts[std::string(w)];
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
