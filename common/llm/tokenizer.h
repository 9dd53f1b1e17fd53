// Byte-level BPE from a Hugging Face tokenizer.json, as GPT-2, Llama 3 and SmolLM2 use it.
//
// Encoding: the text is split on added tokens (<|im_start|> etc., matched verbatim, longest first);
// every other stretch is pre-tokenized (the ByteLevel regex of GPT-2, Split with the file's own
// regex, Digits, or a Sequence of these), each piece's UTF-8 bytes are mapped to GPT-2's printable
// byte alphabet, and BPE merges are applied by rank. Decoding reverses the byte mapping, so any
// UTF-8 text round-trips. Regexes run on PCRE2 with Unicode properties, the same patterns the
// Rust tokenizers crate runs. A tokenizer.json of another kind (SentencePiece/Metaspace, WordPiece,
// a normalizer) is refused by name.
#ifndef FEDLORA_COMMON_LLM_TOKENIZER_H_
#define FEDLORA_COMMON_LLM_TOKENIZER_H_

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

struct PreTokenizer;  // tokenizer.cc

// Encode caches words and is not thread-safe; use one Tokenizer per thread.
class Tokenizer {
 public:
  static absl::StatusOr<Tokenizer> Parse(const nlohmann::json& json, const std::string& origin);
  // Reads <dir>/tokenizer.json.
  static absl::StatusOr<Tokenizer> Read(const std::filesystem::path& dir);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<int32_t> Encode(std::string_view text) const;
  // Special added tokens are left out when `skip_special`.
  std::string Decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  // The id of a token string (a vocabulary entry or an added token), or -1.
  int32_t TokenId(std::string_view token) const;
  // One past the largest id.
  int32_t vocab_size() const { return static_cast<int32_t>(id_to_token_.size()); }
  // The token the post-processor puts first (Llama 3's <|begin_of_text|>), or -1 when it adds none.
  int32_t bos_id() const { return bos_id_; }

 private:
  Tokenizer();
  void EncodeWord(std::string_view piece, std::vector<int32_t>& out) const;

  struct AddedToken {
    std::string content;
    int32_t id;
    bool special, lstrip, rstrip;
  };

  std::unordered_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> is_special_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, merged)
  std::vector<AddedToken> added_;                                     // longest content first
  std::unique_ptr<PreTokenizer> pre_tokenizer_;
  bool ignore_merges_ = false;
  bool add_prefix_space_ = false;
  int32_t bos_id_ = -1;
  mutable std::unordered_map<std::string, std::vector<int32_t>> cache_;
};

// GPT-2's map of a byte onto a printable code point, UTF-8 encoded ("Ġ" for the space).
const std::string& ByteToUnicode(uint8_t byte);

// A byte-level BPE tokenizer.json (GPT-2 pre-tokenizer) whose vocabulary is the 256 bytes, then
// `merges` learned greedily from `corpus` (most frequent adjacent pair first, within
// pre-tokenized words), then the special tokens. For checkpoints made from scratch.
nlohmann::json TrainByteLevelTokenizer(const std::vector<std::string>& corpus, int merges,
                                       const std::vector<std::string>& special_tokens);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_TOKENIZER_H_
