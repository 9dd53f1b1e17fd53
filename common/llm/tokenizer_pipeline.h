// The tokenizer's text stages (tokenizer.h's steps 2, 3 and decoding): the normalizer, the
// pre-tokenizer and the decoder chains of a tokenizer.json, as the `tokenizers` crate runs them.
// Internal to common/llm's tokenizer files.
#ifndef FEDLORA_COMMON_LLM_TOKENIZER_PIPELINE_H_
#define FEDLORA_COMMON_LLM_TOKENIZER_PIPELINE_H_

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "common/base/pcre.h"
#include "common/llm/tokenizer_text.h"

namespace fedlora::common {

// Normalizer, pre-tokenizer and decoder chains.
struct TokenizerPipeline {
  using Behavior = tokenizer_text::Behavior;
  using Piece = tokenizer_text::Piece;

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
  // Each chain's step types ("NFC, Replace"), for the tokenizer's description.
  std::string normalizer_names, pre_tokenizer_names, decoder_names;

  // Reads tokenizer.json's "normalizer", "pre_tokenizer" and "decoder", each a step or a Sequence
  // of steps; a step this reader lacks is refused by name (`origin` names the file).
  absl::Status Parse(const nlohmann::json& json, const std::string& origin);

  // NFC etc., Replace, Prepend, in order, in place.
  void ApplyNormalizers(std::string& text) const;
  // The pieces `text` is cut into, each mapped as its steps ask (ByteLevel: to byte symbols).
  std::vector<Piece> ApplyPreTokenizers(std::string_view text, bool at_start) const;
  // The text of `tokens` through the decoder chain (none: joined by spaces).
  std::string ApplyDecoders(std::vector<std::string> tokens) const;

 private:
  absl::Status ParseNormalizers(const nlohmann::json& json, const std::string& origin);
  absl::Status ParsePreTokenizers(const nlohmann::json& json, const std::string& origin);
  absl::Status ParseDecoders(const nlohmann::json& json, const std::string& origin);
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_TOKENIZER_PIPELINE_H_
