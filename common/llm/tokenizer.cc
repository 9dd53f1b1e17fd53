// Tokenizer (tokenizer.h): reading a tokenizer.json's model (vocabulary, merges, added tokens,
// post-processor), and encoding — added-token splits, the pipeline's stages
// (tokenizer_pipeline.h), BPE merges — and decoding.
#include "common/llm/tokenizer.h"

#include <algorithm>
#include <fstream>
#include <map>
#include <queue>
#include <set>

#include "absl/status/status.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/tokenizer_pipeline.h"
#include "common/llm/tokenizer_text.h"

namespace fedlora::common {
namespace {

using tokenizer_text::CodePointAt;
using tokenizer_text::Flag;
using tokenizer_text::IsWhitespace;
using tokenizer_text::IsWordChar;
using tokenizer_text::Join;
using tokenizer_text::Piece;
using tokenizer_text::PrevCharStart;
using tokenizer_text::Refuse;
using tokenizer_text::Steps;
using tokenizer_text::TypeOf;
using tokenizer_text::Utf8Length;

uint64_t PairKey(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}

}  // namespace

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
  if (!json.is_object() || !json.contains("model") || !json["model"].is_object())
    return Refuse(origin, "no \"model\" object");
  const nlohmann::json& model = json["model"];
  Tokenizer t;
  int32_t max_id = -1;
  RETURN_IF_ERROR(t.ParseModel(model, origin, max_id));
  TokenizerPipeline& pipe = *t.pipeline_;
  RETURN_IF_ERROR(pipe.Parse(json, origin));
  if (pipe.byte_level)
    for (int b = 0; b < 256; ++b)
      if (!t.vocab_.contains(ByteToUnicode(static_cast<uint8_t>(b))))
        return Refuse(origin, StrCat("vocab lacks the byte-level symbol of byte ", b,
                                     " (a ByteLevel pre-tokenizer needs all 256)"));
  RETURN_IF_ERROR(t.ParseAddedTokens(json, origin, max_id));
  RETURN_IF_ERROR(t.ParseMerges(model, origin));
  std::string post_names;
  RETURN_IF_ERROR(t.ParsePostProcessor(json, origin, max_id, &post_names));
  RETURN_IF_ERROR(t.ApplyTokenizerConfig(config, origin));
  t.description_ =
      StrCat("BPE, ", t.vocab_size(), " tokens (", t.added_.size(), " added), ", t.merges_.size(),
             " merges", t.byte_fallback_ ? ", byte fallback" : "",
             t.unk_id_ >= 0 ? StrCat(", unk ", t.id_to_token_[t.unk_id_]) : "", "; normalizer [",
             pipe.normalizer_names, "]; pre-tokenizer [", pipe.pre_tokenizer_names, "]; decoder [",
             pipe.decoder_names, "]; post-processor [", post_names, "]");
  return t;
}

absl::Status Tokenizer::ParseModel(const nlohmann::json& model, const std::string& origin,
                                   int32_t& max_id) {
  if (model.value("type", std::string("BPE")) != "BPE")
    return Refuse(origin, StrCat("model type ", model["type"].dump(), " is not supported"));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (model.contains(key) && !model[key].is_null() && model[key] != "")
      return Refuse(origin, StrCat("BPE ", key, " is set"));
  if (model.contains("dropout") && model["dropout"].is_number() && model["dropout"] != 0)
    return Refuse(origin, "BPE dropout is set (encoding would be random)");
  if (!model.contains("vocab") || !model["vocab"].is_object())
    return Refuse(origin, "no vocab object");

  ignore_merges_ = Flag(model, "ignore_merges", false);
  byte_fallback_ = Flag(model, "byte_fallback", false);
  fuse_unk_ = Flag(model, "fuse_unk", false);
  for (const auto& [token, id] : model["vocab"].items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() >= (1 << 24))
      return Refuse(origin, StrCat("vocab entry \"", token, "\" has id ", id.dump()));
    vocab_[token] = id.get<int32_t>();
    max_id = std::max(max_id, id.get<int32_t>());
  }
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto unk = vocab_.find(model["unk_token"].get<std::string>());
    if (unk == vocab_.end())
      return Refuse(origin,
                    StrCat("unk_token ", model["unk_token"].dump(), " is not in the vocab"));
    unk_id_ = unk->second;
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::ParseAddedTokens(const nlohmann::json& json, const std::string& origin,
                                         int32_t& max_id) {
  if (json.contains("added_tokens") && json["added_tokens"].is_array()) {
    for (const nlohmann::json& a : json["added_tokens"]) {
      if (!a.contains("id") || !a["id"].is_number_integer() || a["id"].get<int64_t>() < 0 ||
          a["id"].get<int64_t>() >= (1 << 24) || !a.contains("content") ||
          !a["content"].is_string() || a["content"].get<std::string>().empty())
        return Refuse(origin, StrCat("added token ", a.dump(), " needs an id and content"));
      AddedToken added{a["content"],
                       a["id"],
                       Flag(a, "special", false),
                       Flag(a, "lstrip", false),
                       Flag(a, "rstrip", false),
                       Flag(a, "single_word", false),
                       Flag(a, "normalized", !Flag(a, "special", false))};
      if (added.normalized) pipeline_->ApplyNormalizers(added.content);
      max_id = std::max(max_id, added.id);
      added_.push_back(std::move(added));
    }
  }
  std::stable_sort(added_.begin(), added_.end(), [](const auto& a, const auto& b) {
    return a.content.size() > b.content.size();
  });
  for (size_t k = 0; k < added_.size(); ++k) {
    const AddedToken& a = added_[k];
    added_by_byte_[a.normalized][static_cast<unsigned char>(a.content[0])].push_back(
        static_cast<int32_t>(k));
  }
  id_to_token_.assign(static_cast<size_t>(max_id) + 1, std::string());
  is_special_.assign(id_to_token_.size(), false);
  for (const auto& [token, id] : vocab_) id_to_token_[id] = token;
  for (const nlohmann::json& a : json.value("added_tokens", nlohmann::json::array())) {
    id_to_token_[a["id"].get<int32_t>()] = a["content"].get<std::string>();
    is_special_[a["id"].get<int32_t>()] = Flag(a, "special", false);
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::ParseMerges(const nlohmann::json& model, const std::string& origin) {
  if (model.contains("merges") && model["merges"].is_array()) {
    int32_t rank = 0;
    for (const nlohmann::json& m : model["merges"]) {
      std::string left, right;
      if (m.is_string()) {
        const std::string s = m;
        const size_t space = s.find(' ');
        if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos)
          return Refuse(origin, StrCat("merge ", m.dump(), " is not \"left right\""));
        left = s.substr(0, space);
        right = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        left = m[0];
        right = m[1];
      } else {
        return Refuse(origin, StrCat("merge ", m.dump(), " is neither \"a b\" nor [\"a\", \"b\"]"));
      }
      auto l = vocab_.find(left), r = vocab_.find(right), merged = vocab_.find(left + right);
      if (l == vocab_.end() || r == vocab_.end() || merged == vocab_.end())
        return Refuse(origin,
                      StrCat("merge ", m.dump(), " uses or makes a token not in the vocab"));
      merges_.emplace(PairKey(l->second, r->second), std::pair{rank++, merged->second});
    }
  }
  return absl::OkStatus();
}

absl::Status Tokenizer::ParsePostProcessor(const nlohmann::json& json, const std::string& origin,
                                           int32_t max_id, std::string* post_names) {
  auto special_ids = [&](const nlohmann::json& ids, std::vector<int32_t>& out) -> absl::Status {
    for (const nlohmann::json& id : ids) {
      if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > max_id)
        return Refuse(origin, StrCat("post-processor adds token id ", id.dump()));
      out.push_back(id.get<int32_t>());
    }
    return absl::OkStatus();
  };
  std::vector<std::string> names;
  for (const nlohmann::json& p :
       Steps(json.value("post_processor", nlohmann::json()), "processors")) {
    const std::string type = TypeOf(p);
    names.push_back(type);
    if (type == "ByteLevel") continue;
    if (type == "BertProcessing" || type == "RobertaProcessing") {
      for (const char* key : {"cls", "sep"})
        if (!p.contains(key) || !p[key].is_array() || p[key].size() != 2)
          return Refuse(origin, StrCat(type, " needs \"", key, "\": [token, id]"));
      RETURN_IF_ERROR(special_ids(nlohmann::json::array({p["cls"][1]}), prefix_));
      RETURN_IF_ERROR(special_ids(nlohmann::json::array({p["sep"][1]}), suffix_));
      continue;
    }
    if (type != "TemplateProcessing" || !p.contains("single") || !p["single"].is_array())
      return Refuse(origin, StrCat("post-processor ", type, " is not supported"));
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
                               : nlohmann::json::array({TokenId(id)});
      RETURN_IF_ERROR(special_ids(ids, after ? suffix_ : prefix_));
    }
  }
  *post_names = Join(names, ", ");
  return absl::OkStatus();
}

absl::Status Tokenizer::ApplyTokenizerConfig(const nlohmann::json& config,
                                             const std::string& origin) {
  static const std::set<std::string> kRebuilding = {"LlamaTokenizer",     "LlamaTokenizerFast",
                                                    "CodeLlamaTokenizer", "CodeLlamaTokenizerFast",
                                                    "GemmaTokenizer",     "GemmaTokenizerFast"};
  if (!config.is_object() || !kRebuilding.contains(config.value("tokenizer_class", std::string())))
    return absl::OkStatus();
  auto token = [&](const char* key, bool wanted, std::vector<int32_t>& out) -> absl::Status {
    out.clear();
    if (!wanted) return absl::OkStatus();
    const nlohmann::json v = config.value(key, nlohmann::json());
    const std::string content = v.is_string()   ? v.get<std::string>()
                                : v.is_object() ? v.value("content", std::string())
                                                : std::string();
    const int32_t id = TokenId(content);
    if (id < 0)
      return Refuse(origin, StrCat("tokenizer_config.json asks for ", key, " ", v.dump(),
                                   ", which is not a token"));
    out.push_back(id);
    return absl::OkStatus();
  };
  RETURN_IF_ERROR(token("bos_token", Flag(config, "add_bos_token", true), prefix_));
  RETURN_IF_ERROR(token("eos_token", Flag(config, "add_eos_token", false), suffix_));
  return absl::OkStatus();
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

}  // namespace fedlora::common
