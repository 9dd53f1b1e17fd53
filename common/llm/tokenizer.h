// BPE tokenizers from a Hugging Face tokenizer.json, with the semantics of the `tokenizers` crate,
// as Llama 2/3, TinyLlama, Mistral, SmolLM2, Qwen2/3, Gemma 3 and DeepSeek-V3 ship them.
//
// Encoding runs the crate's pipeline:
//   1. the text is split on added tokens that are not `normalized` (<|im_start|>, <s>, ...: matched
//      verbatim, leftmost-longest, with their lstrip/rstrip/single_word rules);
//   2. each other stretch is normalized (NFC, NFD, NFKC, NFKD, Replace, Prepend, or a Sequence of
//      these) and split again on the `normalized` added tokens;
//   3. each stretch is pre-tokenized (ByteLevel — GPT-2's regex and byte alphabet —, Split with the
//      file's pattern and any of its five behaviours, Digits, Metaspace, or a Sequence of these);
//   4. each piece is encoded by BPE: its characters are the initial symbols — a character missing
//      from the vocabulary becomes its `<0xNN>` byte tokens with byte_fallback, else the unk_token
//      (fused when fuse_unk), else is dropped, as the crate does —, then merges apply by rank.
// Decoding maps ids back to token strings and runs the decoder chain (ByteLevel, Replace,
// ByteFallback, Fuse, Strip, Metaspace, Sequence; none: the tokens joined by spaces). Regexes run
// on PCRE2 with Unicode properties; normal forms come from utf8proc. Anything else (WordPiece or
// Unigram models, a SentencePiece precompiled charsmap, other normalizers or pre-tokenizers) is
// refused by name.
//
// The post-processor's special tokens (a TemplateProcessing's BOS/EOS around $A; Bert's and
// Roberta's cls/sep) are added only when asked. transformers' Llama and Gemma tokenizer classes
// rebuild that template from tokenizer_config.json's add_bos_token / add_eos_token, and so does
// this class when given that file.
#ifndef FEDLORA_COMMON_LLM_TOKENIZER_H_
#define FEDLORA_COMMON_LLM_TOKENIZER_H_

#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

inline constexpr char kTokenizerFile[] = "tokenizer.json";
inline constexpr char kTokenizerConfigFile[] = "tokenizer_config.json";

struct TokenizerPipeline;  // tokenizer_pipeline.h

// Encode caches words and is not thread-safe; use one Tokenizer per thread.
class Tokenizer {
 public:
  // `config` is tokenizer_config.json's object, or null.
  static absl::StatusOr<Tokenizer> Parse(const nlohmann::json& json, const std::string& origin,
                                         const nlohmann::json& config = nullptr);
  // Reads <dir>/tokenizer.json and, if present, <dir>/tokenizer_config.json (ReadTokenizerFiles).
  static absl::StatusOr<Tokenizer> Read(const std::filesystem::path& dir);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // The ids of `text`; with `add_special`, the post-processor's tokens around them. Text that is
  // not valid UTF-8 is read with U+FFFD in place of each bad sequence.
  std::vector<int32_t> Encode(std::string_view text, bool add_special = false) const;
  // Special added tokens are left out when `skip_special`. Bytes that do not form UTF-8 come out
  // as U+FFFD, as the crate's decoders make them.
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  // The id of a token string (a vocabulary entry or an added token), or -1.
  int32_t TokenId(std::string_view token) const;
  // One past the largest id.
  int32_t vocab_size() const { return static_cast<int32_t>(id_to_token_.size()); }
  // The token the post-processor puts first (Llama's <s>), or -1 when it adds none.
  int32_t bos_id() const { return prefix_.empty() ? -1 : prefix_.front(); }
  // What the post-processor adds before and after a single sequence.
  const std::vector<int32_t>& prefix() const { return prefix_; }
  const std::vector<int32_t>& suffix() const { return suffix_; }
  // One line on what the pipeline is: "BPE, 32000 tokens, normalizer Sequence[Prepend, Replace],
  // ...", for `fedlora inspect`.
  const std::string& description() const { return description_; }

 private:
  Tokenizer();
  // Parse without the guard against JSON of unexpected types (which nlohmann reports by throwing).
  static absl::StatusOr<Tokenizer> ParseUnguarded(const nlohmann::json& json,
                                                  const std::string& origin,
                                                  const nlohmann::json& config);
  // ParseUnguarded's stages, in its order; `max_id` grows to the largest id they meet.
  // The BPE model's options, vocabulary and unk_token.
  absl::Status ParseModel(const nlohmann::json& model, const std::string& origin, int32_t& max_id);
  // added_tokens (the normalized ones in normalized form), then the id → token table.
  absl::Status ParseAddedTokens(const nlohmann::json& json, const std::string& origin,
                                int32_t& max_id);
  absl::Status ParseMerges(const nlohmann::json& model, const std::string& origin);
  // The post-processor's tokens around a single sequence; `post_names` gets its step types.
  absl::Status ParsePostProcessor(const nlohmann::json& json, const std::string& origin,
                                  int32_t max_id, std::string* post_names);
  // transformers' Llama and Gemma classes rebuild the template from tokenizer_config.json.
  absl::Status ApplyTokenizerConfig(const nlohmann::json& config, const std::string& origin);
  void EncodeWord(std::string_view word, std::vector<int32_t>& out) const;
  // Splits on the added tokens whose `normalized` flag equals `normalized`; stretches between them
  // go to `rest` with whether they start the text.
  template <typename Rest>
  void SplitAdded(std::string_view text, bool normalized, bool at_start, std::vector<int32_t>& out,
                  Rest&& rest) const;

  struct AddedToken {
    std::string content;  // normalized with the file's normalizer when `normalized`
    int32_t id;
    bool special, lstrip, rstrip, single_word, normalized;
  };

  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> is_special_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, merged)
  std::vector<AddedToken> added_;                                     // longest content first
  // Indices into added_ by [normalized][first byte], longest first: what can match at a position.
  std::array<std::array<std::vector<int32_t>, 256>, 2> added_by_byte_;
  std::unique_ptr<TokenizerPipeline> pipeline_;
  bool ignore_merges_ = false;
  bool byte_fallback_ = false;
  bool fuse_unk_ = false;
  int32_t unk_id_ = -1;
  std::vector<int32_t> prefix_, suffix_;
  std::string description_;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

// A model directory's tokenizer.json and tokenizer_config.json (null when the directory has none),
// parsed; for what reads more of them than Tokenizer keeps (the GGUF export).
struct TokenizerFiles {
  nlohmann::json tokenizer, config;
};
absl::StatusOr<TokenizerFiles> ReadTokenizerFiles(const std::filesystem::path& dir);

// GPT-2's map of a byte onto a printable code point, UTF-8 encoded ("Ġ" for the space).
const std::string& ByteToUnicode(uint8_t byte);

// `bytes` as UTF-8, each maximal ill-formed subsequence replaced by U+FFFD (what Rust's
// String::from_utf8_lossy and Python's errors="replace" do).
std::string Utf8Lossy(std::string_view bytes);

// A byte-level BPE tokenizer.json (GPT-2 pre-tokenizer) whose vocabulary is the 256 bytes, then
// `merges` learned greedily from `corpus` (most frequent adjacent pair first, within
// pre-tokenized words), then the special tokens. For checkpoints made from scratch.
nlohmann::json TrainByteLevelTokenizer(const std::vector<std::string>& corpus, int merges,
                                       const std::vector<std::string>& special_tokens);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_TOKENIZER_H_
