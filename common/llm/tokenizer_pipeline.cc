#include "common/llm/tokenizer_pipeline.h"

#include <utf8proc.h>

#include <cctype>
#include <cstdlib>
#include <map>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/tokenizer.h"

namespace fedlora::common {

using tokenizer_text::ByteTable;
using tokenizer_text::Compile;
using tokenizer_text::CompilePattern;
using tokenizer_text::Flag;
using tokenizer_text::Join;
using tokenizer_text::kGpt2Pattern;
using tokenizer_text::OneChar;
using tokenizer_text::Refuse;
using tokenizer_text::ReplaceAll;
using tokenizer_text::ReplaceLiteral;
using tokenizer_text::SplitPiece;
using tokenizer_text::Steps;
using tokenizer_text::TypeOf;
using tokenizer_text::UnicodeToByte;
using tokenizer_text::Utf8Length;

absl::Status TokenizerPipeline::Parse(const nlohmann::json& json, const std::string& origin) {
  RETURN_IF_ERROR(ParseNormalizers(json, origin));
  RETURN_IF_ERROR(ParsePreTokenizers(json, origin));
  return ParseDecoders(json, origin);
}

absl::Status TokenizerPipeline::ParseNormalizers(const nlohmann::json& json,
                                                 const std::string& origin) {
  std::vector<std::string> names;
  for (const nlohmann::json& n : Steps(json.value("normalizer", nlohmann::json()), "normalizers")) {
    const std::string type = TypeOf(n);
    Normalize step;
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
      return Refuse(origin, StrCat("normalizer ", type, " is not supported"));
    }
    names.push_back(type);
    normalizers.push_back(std::move(step));
  }
  normalizer_names = Join(names, ", ");
  return absl::OkStatus();
}

absl::Status TokenizerPipeline::ParsePreTokenizers(const nlohmann::json& json,
                                                   const std::string& origin) {
  std::vector<std::string> names;
  for (const nlohmann::json& p :
       Steps(json.value("pre_tokenizer", nlohmann::json()), "pretokenizers")) {
    const std::string type = TypeOf(p);
    using Kind = PreTokenize::Kind;
    PreTokenize step{Kind::kSplit};
    if (type == "ByteLevel") {
      step.kind = Kind::kByteLevel;
      step.add_prefix_space = Flag(p, "add_prefix_space", false);
      if (Flag(p, "use_regex", true)) {
        ASSIGN_OR_RETURN(step.re, Compile(kGpt2Pattern, false, origin));
      }
      byte_level = true;
    } else if (type == "Digits") {
      ASSIGN_OR_RETURN(step.re, Compile(R"(\p{N})", false, origin));
      step.behavior =
          Flag(p, "individual_digits", false) ? Behavior::kIsolated : Behavior::kContiguous;
    } else if (type == "Split") {
      ASSIGN_OR_RETURN(step.re, CompilePattern(p.value("pattern", nlohmann::json()), origin));
      step.invert = Flag(p, "invert", false);
      static const std::map<std::string, Behavior> kBehaviors = {
          {"Removed", Behavior::kRemoved},
          {"Isolated", Behavior::kIsolated},
          {"MergedWithPrevious", Behavior::kMergedWithPrevious},
          {"MergedWithNext", Behavior::kMergedWithNext},
          {"Contiguous", Behavior::kContiguous}};
      auto behavior = kBehaviors.find(p.value("behavior", std::string("Isolated")));
      if (behavior == kBehaviors.end())
        return Refuse(origin, StrCat("Split behavior ", p["behavior"].dump(), " is not supported"));
      step.behavior = behavior->second;
    } else if (type == "Metaspace") {
      step.kind = Kind::kMetaspace;
      ASSIGN_OR_RETURN(step.replacement, OneChar(p, "replacement", "\u2581", origin));
      ASSIGN_OR_RETURN(step.re, Compile(step.replacement, true, origin));
      step.split = Flag(p, "split", true);
      // prepend_scheme, or the older add_prefix_space (true: always).
      const std::string scheme = p.value(
          "prepend_scheme", std::string(Flag(p, "add_prefix_space", true) ? "always" : "never"));
      using Prepend = PreTokenize::Prepend;
      if (scheme != "always" && scheme != "first" && scheme != "never")
        return Refuse(origin, StrCat("Metaspace prepend_scheme \"", scheme, "\""));
      step.prepend = scheme == "always"  ? Prepend::kAlways
                     : scheme == "first" ? Prepend::kFirst
                                         : Prepend::kNever;
    } else {
      return Refuse(origin, StrCat("pre-tokenizer ", type, " is not supported"));
    }
    names.push_back(type);
    pre_tokenizers.push_back(std::move(step));
  }
  pre_tokenizer_names = Join(names, ", ");
  return absl::OkStatus();
}

absl::Status TokenizerPipeline::ParseDecoders(const nlohmann::json& json,
                                              const std::string& origin) {
  std::vector<std::string> names;
  has_decoder = json.contains("decoder") && !json["decoder"].is_null();
  for (const nlohmann::json& d : Steps(json.value("decoder", nlohmann::json()), "decoders")) {
    const std::string type = TypeOf(d);
    using Kind = Decode::Kind;
    Decode step{Kind::kFuse};
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
                  std::string(Flag(d, "add_prefix_space", true) ? "always" : "never")) != "never";
    } else {
      return Refuse(origin, StrCat("decoder ", type, " is not supported"));
    }
    names.push_back(type);
    decoders.push_back(std::move(step));
  }
  decoder_names = Join(names, ", ");
  return absl::OkStatus();
}

void TokenizerPipeline::ApplyNormalizers(std::string& text) const {
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

std::vector<TokenizerPipeline::Piece> TokenizerPipeline::ApplyPreTokenizers(std::string_view text,
                                                                            bool at_start) const {
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

std::string TokenizerPipeline::ApplyDecoders(std::vector<std::string> tokens) const {
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

}  // namespace fedlora::common
