#include "common/llm/gguf_export.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <unordered_map>

#include "absl/strings/str_join.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/llama.h"
#include "common/llm/llama_config.h"
#include "common/llm/tokenizer.h"

namespace fedlora::common {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// llama.cpp's token types (llama.h's llama_token_type).
enum TokenType : int32_t {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6
};

struct Architecture {
  std::string name;
  bool permute_qk = false;  // llama: Hugging Face's rotate_half rows → llama.cpp's interleaved
  int context_length = 0;
};

absl::StatusOr<Architecture> ArchitectureOf(const LlamaConfig& c, std::vector<std::string>& notes) {
  Architecture arch;
  const auto refuse = [&](const std::string& why) {
    return absl::FailedPreconditionError(
        StrCat("cannot export this ", c.model_type, " model to GGUF: ", why));
  };
  const bool any_bias = std::any_of(c.bias.begin(), c.bias.end(), [](bool b) { return b; });
  if (c.model_type == "llama" || c.model_type == "mistral") {
    arch = {"llama", true};
    if (any_bias)
      return refuse(
          "it has biases (attention_bias or mlp_bias), which fedlora does not export for "
          "llama.cpp's llama architecture (no Llama or Mistral checkpoint has them)");
  } else if (c.model_type == "qwen2") {
    arch = {"qwen2", false};
    const std::array<bool, kNumLinearKinds> qkv = {true, true, true, false, false, false, false};
    if (c.bias != qkv)
      return refuse(
          "llama.cpp's qwen2 architecture needs biases on q, k and v and on nothing else");
  } else if (c.model_type == "qwen3") {
    arch = {"qwen3", false};
    if (any_bias) return refuse("llama.cpp's qwen3 architecture has no attention biases");
  } else {
    return refuse("llama.cpp architectures are known here for llama, mistral, qwen2 and qwen3");
  }
  switch (c.rope_scaling.type) {
    case RopeScaling::Type::kNone:
    case RopeScaling::Type::kLinear:
      break;
    case RopeScaling::Type::kLlama3:
      if (arch.name != "llama")
        return refuse("llama.cpp reads Llama 3's rope frequencies only for the llama architecture");
      break;
    case RopeScaling::Type::kDynamic:
      return refuse("llama.cpp has no dynamic (NTK) rope scaling");
  }
  arch.context_length = c.max_position_embeddings;
  int window = 0;
  for (int w : c.layer_window)
    if (w > 0) window = window == 0 ? w : std::min(window, w);
  if (window > 0 && window < arch.context_length) {
    arch.context_length = window;
    notes.push_back(StrCat(
        "the model attends over a sliding window of ", window, " tokens, which llama.cpp's ",
        arch.name,
        " architecture does not implement: the file's context_length is the window, within which "
        "llama.cpp computes what fedlora does"));
  }
  return arch;
}

// Hugging Face's tensor name → llama.cpp's; empty for a name llama.cpp does not know.
std::string GgufTensorName(const std::string& hf) {
  static const std::map<std::string, std::string> kTop = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"},
      {"lm_head.weight", "output.weight"}};
  static const std::map<std::string, std::string> kLayer = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"self_attn.q_norm.weight", "attn_q_norm.weight"},
      {"self_attn.k_norm.weight", "attn_k_norm.weight"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"}};
  if (auto it = kTop.find(hf); it != kTop.end()) return it->second;
  constexpr std::string_view kLayers = "model.layers.";
  if (!hf.starts_with(kLayers)) return "";
  const size_t digits = hf.find_first_not_of("0123456789", kLayers.size());
  if (digits == kLayers.size() || digits == std::string::npos || hf[digits] != '.') return "";
  auto it = kLayer.find(hf.substr(digits + 1));
  return it == kLayer.end()
             ? ""
             : StrCat("blk.", hf.substr(kLayers.size(), digits - kLayers.size()), ".", it->second);
}

// SentencePiece's byte tokens: "<0x0A>".
bool IsByteToken(const std::string& t) {
  return t.size() == 6 && t.starts_with("<0x") && t.back() == '>' &&
         t.find_first_not_of("0123456789ABCDEF", 3) == 5;
}

// Rows of a q or k projection (or its bias, or a LoRA B), `heads` heads of head_dim rows each,
// from rotate_half's order (first halves, then second halves of each head) to the interleaved
// order llama.cpp's llama architecture rotates in: convert_hf_to_gguf.py's permute().
std::vector<std::byte> PermuteHeads(StoredSpan w, int heads, int64_t cols) {
  std::vector<std::byte> out(w.size_bytes());
  const int64_t rows = static_cast<int64_t>(w.size()) / cols, half = rows / heads / 2;
  const size_t row_bytes = static_cast<size_t>(cols) * DTypeSize(w.dtype());
  const auto* in = static_cast<const std::byte*>(w.data());
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < half; ++i)
      for (int64_t j = 0; j < 2; ++j)
        std::memcpy(out.data() + ((h * half + i) * 2 + j) * row_bytes,
                    in + ((h * 2 + j) * half + i) * row_bytes, row_bytes);
  return out;
}

// The heads whose rows PermuteHeads reorders for a tensor (q: query heads, k: key/value heads),
// or 0 for any other tensor.
int PermutedHeads(const LlamaConfig& c, const std::string& gguf_name) {
  if (gguf_name.find(".attn_q.") != std::string::npos) return c.num_attention_heads;
  if (gguf_name.find(".attn_k.") != std::string::npos) return c.num_key_value_heads;
  return 0;
}

// ---- The tokenizer.

// What llama.cpp calls the tokenizer.json's pre-tokenizer, or an error naming what it is.
absl::StatusOr<std::string> BytePreTokenizer(const json& pre, const json& model,
                                             const json& normalizer) {
  // Flatten a Sequence into its parts, each described in a line.
  std::vector<std::string> parts;
  std::vector<json> steps = pre.value("type", "") == "Sequence"
                                ? pre.value("pretokenizers", std::vector<json>{})
                                : std::vector<json>{pre};
  for (const json& s : steps) {
    const std::string type = s.value("type", "");
    if (type == "Split" && s.contains("pattern") && s["pattern"].contains("Regex") &&
        s.value("behavior", "") == "Isolated" && !s.value("invert", false))
      parts.push_back(StrCat("Split ", s["pattern"]["Regex"].get<std::string>()));
    else if (type == "ByteLevel" && !s.value("add_prefix_space", false))
      parts.push_back(s.value("use_regex", true) ? "ByteLevel gpt2" : "ByteLevel");
    else if (type == "Digits" && s.value("individual_digits", false))
      parts.push_back("Digits");
    else
      parts.push_back(StrCat("(", s.dump(), ")"));
  }
  static const std::string kLlama3 =
      R"(Split (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static const std::string kQwen2 =
      R"(Split (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
  static const std::vector<std::string> kDeepSeekV3{
      R"(Split \p{N}{1,3})", "Split [\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
      "Split "
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}"
      "\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
      "ByteLevel"};
  static const std::map<std::vector<std::string>, std::string> kKnown = {
      {{kLlama3, "ByteLevel"}, "llama-bpe"},
      {{kQwen2, "ByteLevel"}, "qwen2"},
      {{"ByteLevel gpt2"}, "gpt-2"},
      {{"Digits", "ByteLevel gpt2"}, "smollm"},
      {kDeepSeekV3, "deepseek-v3"}};
  auto it = kKnown.find(parts);
  if (it == kKnown.end())
    return absl::FailedPreconditionError(
        StrCat("llama.cpp has no pre-tokenizer known to split text as this tokenizer.json does (",
               absl::StrJoin(parts, "; "),
               "); known: Llama 3's, Qwen2's, GPT-2's, SmolLM's, DeepSeek-V3's"));
  // llama.cpp applies no normalizer to byte-level BPE; NFC (Qwen's) changes only text that is
  // not already in NFC, which is what tokenizers hand it in practice.
  const std::string norm = normalizer.is_null() ? "" : normalizer.value("type", "");
  const bool empty_sequence =
      norm == "Sequence" && normalizer.value("normalizers", json::array()).empty();
  if (!(norm.empty() || empty_sequence || (norm == "NFC" && it->second == "qwen2")))
    return absl::FailedPreconditionError(StrCat("llama.cpp's ", it->second,
                                                " tokenizer applies no normalizer; this one has ",
                                                normalizer.dump()));
  // llama.cpp skips the merges for words in the vocabulary (tokenizers' ignore_merges) for Llama
  // 3's pre-tokenizer, and only for it.
  if (model.value("ignore_merges", false) != (it->second == "llama-bpe"))
    return absl::FailedPreconditionError(
        StrCat("the tokenizer's ignore_merges is ", model.value("ignore_merges", false),
               ", which llama.cpp's ", it->second, " tokenizer does not do"));
  return it->second;
}

// Llama 2's tokenizer.json: SentencePiece-style BPE over "▁"-escaped text with byte fallback,
// either as Prepend + Replace normalizers or as a Metaspace pre-tokenizer.
bool IsSentencePieceStyle(const json& tokenizer) {
  const json& model = tokenizer["model"];
  if (!model.value("byte_fallback", false)) return false;
  const json& norm = tokenizer["normalizer"];
  const json& pre = tokenizer["pre_tokenizer"];
  static const json kPrependReplace = json::parse(
      R"([{"type": "Prepend", "prepend": "▁"},
          {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}])");
  if (pre.is_null() && !norm.is_null() && norm.value("type", "") == "Sequence" &&
      norm.value("normalizers", json::array()) == kPrependReplace)
    return true;
  return norm.is_null() && !pre.is_null() && pre.value("type", "") == "Metaspace" &&
         pre.value("replacement", "") == "▁" && pre.value("prepend_scheme", "always") != "never" &&
         !pre.value("split", false);
}

// "a b" for either spelling of a merge in tokenizer.json.
std::string MergeString(const json& merge) {
  return merge.is_string() ? merge.get<std::string>()
                           : StrCat(merge[0].get<std::string>(), " ", merge[1].get<std::string>());
}

std::string TokenString(const json& value) {
  if (value.is_string()) return value.get<std::string>();
  if (value.is_object() && value.contains("content") && value["content"].is_string())
    return value["content"].get<std::string>();
  return "";
}

absl::Status SetTokenizerUnguarded(const fs::path& dir, const LlamaConfig& config, GgufWriter& gguf,
                                   GgufExport& report) {
  // Read once: Tokenizer takes the pipeline from the files, the GGUF metadata the vocabulary.
  ASSIGN_OR_RETURN(const TokenizerFiles files, ReadTokenizerFiles(dir));
  const json& tokenizer = files.tokenizer;
  const json& config_json = files.config;
  ASSIGN_OR_RETURN(const Tokenizer parsed,
                   Tokenizer::Parse(tokenizer, (dir / kTokenizerFile).string(), config_json));
  const json& model = tokenizer["model"];
  if (model.value("type", "") != "BPE")
    return absl::FailedPreconditionError(
        StrCat("llama.cpp's tokenizers for these families are BPE; this tokenizer.json's model is ",
               model.value("type", "?")));

  // Ids: the model's vocabulary, the added tokens, and "[PAD<i>]" for ids up to the embedding's
  // rows that neither names (as convert_hf_to_gguf.py pads them).
  std::vector<std::string> tokens(static_cast<size_t>(config.vocab_size));
  std::vector<int32_t> types(tokens.size(), kUnused);
  const auto place = [&](int64_t id, const std::string& text, int32_t type) -> absl::Status {
    if (id < 0 || id >= config.vocab_size)
      return absl::FailedPreconditionError(StrCat("token '", text, "' has id ", id,
                                                  ", outside the model's vocabulary of ",
                                                  config.vocab_size));
    tokens[static_cast<size_t>(id)] = text;
    types[static_cast<size_t>(id)] = type;
    return absl::OkStatus();
  };
  for (const auto& [text, id] : model["vocab"].items()) RETURN_IF_ERROR(place(id, text, kNormal));
  for (const json& added : tokenizer.value("added_tokens", json::array()))
    RETURN_IF_ERROR(place(added.value("id", -1), added.value("content", ""),
                          added.value("special", false) ? kControl : kUserDefined));
  std::unordered_map<std::string, size_t> seen;  // llama.cpp refuses a string with two ids
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i].empty()) tokens[i] = StrCat("[PAD", i, "]");
    if (auto [it, added] = seen.emplace(tokens[i], i); !added)
      return absl::FailedPreconditionError(StrCat("token '", tokens[i], "' has ids ", it->second,
                                                  " and ", i,
                                                  "; llama.cpp needs one id per token"));
  }
  const std::string unk = model.value("unk_token", json(nullptr)).is_string()
                              ? model["unk_token"].get<std::string>()
                              : "";

  std::vector<std::string> merges;
  for (const json& m : model.value("merges", json::array())) merges.push_back(MergeString(m));

  const bool byte_level = !IsSentencePieceStyle(tokenizer);
  if (byte_level) {
    if (model.value("byte_fallback", false) || tokenizer["pre_tokenizer"].is_null())
      return absl::FailedPreconditionError(
          "llama.cpp knows byte-level BPE (a ByteLevel pre-tokenizer) and Llama 2's "
          "SentencePiece-style BPE (byte fallback, ▁ for spaces); this tokenizer.json is neither");
    ASSIGN_OR_RETURN(const std::string pre,
                     BytePreTokenizer(tokenizer["pre_tokenizer"], model, tokenizer["normalizer"]));
    gguf.Set("tokenizer.ggml.model", std::string("gpt2"));
    gguf.Set("tokenizer.ggml.pre", pre);
    report.tokenizer = "gpt2/" + pre;
  } else {
    // llama.cpp's SentencePiece tokenizer merges the adjacent pair whose joined text is the token
    // of highest score: scores that fall with the merge rank reproduce the BPE's merge order.
    std::unordered_map<std::string, size_t> rank;
    for (size_t r = 0; r < merges.size(); ++r) {
      const size_t space = merges[r].find(' ', 1);
      std::string joined = merges[r];
      if (space != std::string::npos) joined.erase(space, 1);
      rank.emplace(std::move(joined), r);
    }
    std::vector<float> scores(tokens.size(), 0.0f);
    for (size_t i = 0; i < tokens.size(); ++i) {
      if (auto it = rank.find(tokens[i]); it != rank.end())
        scores[i] = -static_cast<float>(it->second);
      else if (types[i] == kNormal)
        scores[i] = -static_cast<float>(merges.size());  // single characters: never a merge
      if (types[i] == kNormal && IsByteToken(tokens[i])) types[i] = kByte;
      if (tokens[i] == unk) types[i] = kUnknown;
    }
    gguf.Set("tokenizer.ggml.model", std::string("llama"));
    gguf.Set("tokenizer.ggml.pre", std::string("default"));
    gguf.Set("tokenizer.ggml.scores", std::move(scores));
    gguf.Set("tokenizer.ggml.add_space_prefix", true);
    report.tokenizer = "llama";
  }
  gguf.Set("tokenizer.ggml.tokens", tokens);
  gguf.Set("tokenizer.ggml.token_type", types);
  if (byte_level) gguf.Set("tokenizer.ggml.merges", std::move(merges));

  // Special tokens: BOS and EOS as the post-processor adds them (transformers' rule, which
  // Tokenizer follows), config.json's ids otherwise.
  if (parsed.prefix().size() > 1 || parsed.suffix().size() > 1)
    return absl::FailedPreconditionError(
        StrCat("the tokenizer adds ", parsed.prefix().size(), " tokens before and ",
               parsed.suffix().size(), " after a text; llama.cpp adds at most a BOS and an EOS"));
  const int32_t bos = parsed.bos_id() >= 0 ? parsed.bos_id() : config.bos_token_id;
  if (bos >= 0) gguf.Set("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(bos));
  gguf.Set("tokenizer.ggml.add_bos_token", !parsed.prefix().empty());
  const int32_t eos = !parsed.suffix().empty()        ? parsed.suffix()[0]
                      : !config.eos_token_ids.empty() ? config.eos_token_ids[0]
                                                      : -1;
  if (eos >= 0) gguf.Set("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(eos));
  gguf.Set("tokenizer.ggml.add_eos_token", !parsed.suffix().empty());
  if (const int32_t id = parsed.TokenId(unk); !unk.empty() && id >= 0)
    gguf.Set("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(id));
  if (config_json.is_object()) {
    if (const int32_t pad = parsed.TokenId(TokenString(config_json.value("pad_token", json())));
        pad >= 0)
      gguf.Set("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(pad));
    if (config_json.contains("chat_template") && config_json["chat_template"].is_string())
      gguf.Set("tokenizer.chat_template", config_json["chat_template"].get<std::string>());
  }
  return absl::OkStatus();
}

// The tokenizer of the model in `dir` as GGUF metadata. Tokenizer::Read has checked the file
// first; a field of another JSON type than expected is still an error, not an exception.
absl::Status SetTokenizer(const fs::path& dir, const LlamaConfig& config, GgufWriter& gguf,
                          GgufExport& report) {
  try {
    return SetTokenizerUnguarded(dir, config, gguf, report);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(
        StrCat((dir / kTokenizerFile).string(), ": unexpected JSON: ", e.what()));
  }
}

// ---- Metadata and tensors.

void SetArchitecture(const LlamaConfig& c, const Architecture& arch, const std::string& name,
                     GgufWriter& gguf) {
  const std::string a = arch.name;
  gguf.Set("general.architecture", a);
  gguf.Set("general.name", name);
  gguf.Set(a + ".context_length", static_cast<uint32_t>(arch.context_length));
  gguf.Set(a + ".embedding_length", static_cast<uint32_t>(c.hidden_size));
  gguf.Set(a + ".block_count", static_cast<uint32_t>(c.num_hidden_layers));
  gguf.Set(a + ".feed_forward_length", static_cast<uint32_t>(c.intermediate_size));
  gguf.Set(a + ".attention.head_count", static_cast<uint32_t>(c.num_attention_heads));
  gguf.Set(a + ".attention.head_count_kv", static_cast<uint32_t>(c.num_key_value_heads));
  gguf.Set(a + ".attention.key_length", static_cast<uint32_t>(c.head_dim));
  gguf.Set(a + ".attention.value_length", static_cast<uint32_t>(c.head_dim));
  gguf.Set(a + ".attention.layer_norm_rms_epsilon", static_cast<float>(c.rms_norm_eps));
  gguf.Set(a + ".rope.freq_base", static_cast<float>(c.rope_theta));
  gguf.Set(a + ".rope.dimension_count", static_cast<uint32_t>(c.head_dim));
  gguf.Set(a + ".vocab_size", static_cast<uint32_t>(c.vocab_size));
  if (c.rope_scaling.type == RopeScaling::Type::kLinear) {
    gguf.Set(a + ".rope.scaling.type", std::string("linear"));
    gguf.Set(a + ".rope.scaling.factor", static_cast<float>(c.rope_scaling.factor));
  }
}

// Llama 3's rope scaling as llama.cpp takes it: a factor per frequency that divides θ^(-2i/D)
// (transformers' _compute_llama3_parameters, as a divisor).
std::vector<float> Llama3RopeFactors(const LlamaConfig& c) {
  const RopeScaling& s = c.rope_scaling;
  const double old_context = s.original_max_position_embeddings;
  const double low_wavelen = old_context / s.low_freq_factor;
  const double high_wavelen = old_context / s.high_freq_factor;
  std::vector<float> factors;
  for (int i = 0; i < c.head_dim / 2; ++i) {
    const double freq = std::pow(c.rope_theta, -2.0 * i / c.head_dim);
    const double wavelen = 2 * M_PI / freq;
    double f = 1;
    if (wavelen > low_wavelen) {
      f = s.factor;
    } else if (wavelen >= high_wavelen) {
      const double smooth =
          (old_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      f = 1 / ((1 - smooth) / s.factor + smooth);
    }
    factors.push_back(static_cast<float>(f));
  }
  return factors;
}

uint32_t FileType(GgmlType type) {  // llama.h's llama_ftype
  switch (type) {
    case GgmlType::kF32:
      return 0;
    case GgmlType::kF16:
      return 1;
    case GgmlType::kQ8_0:
      return 7;
    case GgmlType::kBF16:
      return 32;
  }
  return 0;
}

absl::Status WriteGguf(const fs::path& out, const GgufWriter& gguf, Env* env) {
  return WriteFileAtomically(
      out, [&](std::FILE* f) { return gguf.Write(f); }, env);
}

std::string ModelName(const fs::path& dir) {
  const fs::path clean = dir.lexically_normal();
  return (clean.has_filename() ? clean.filename() : clean.parent_path().filename()).string();
}

// A model's file before its tensors: the architecture's and the tokenizer's metadata, for a model
// of `config` whose tokenizer is in `dir`. What llama.cpp would compute differently is refused
// here.
struct ModelFile {
  GgufWriter gguf;
  Architecture arch;
  GgufExport report;
};

absl::StatusOr<ModelFile> ModelMetadata(const LlamaConfig& config, const fs::path& dir,
                                        GgmlType type) {
  ModelFile file;
  ASSIGN_OR_RETURN(file.arch, ArchitectureOf(config, file.report.notes));
  SetArchitecture(config, file.arch, ModelName(dir), file.gguf);
  file.gguf.Set("general.file_type", FileType(type));
  if (type == GgmlType::kQ8_0) file.gguf.Set("general.quantization_version", uint32_t{2});
  RETURN_IF_ERROR(SetTokenizer(dir, config, file.gguf, file.report));
  return file;
}

// `weights` into `file`, which is then written atomically to `out`: 2-D weights as `type` (Q8_0
// falls back to F16 for rows that are not a multiple of 32), the rest F32; llama's q and k rows
// permuted.
absl::StatusOr<GgufExport> WriteModel(ModelFile& file, const LlamaWeights& weights, GgmlType type,
                                      const fs::path& out, Env* env) {
  const LlamaConfig& config = weights.config();
  GgufWriter& gguf = file.gguf;
  std::vector<float> rope_factors;
  if (config.rope_scaling.type == RopeScaling::Type::kLlama3) {
    rope_factors = Llama3RopeFactors(config);
    RETURN_IF_ERROR(gguf.AddTensor("rope_freqs.weight", {static_cast<int64_t>(rope_factors.size())},
                                   rope_factors, GgmlType::kF32));
  }
  std::vector<std::vector<std::byte>> permuted;  // the q and k tensors, reordered
  for (const TensorToWrite& t : weights.Tensors()) {
    const std::string name = GgufTensorName(t.name);
    if (name.empty())
      return absl::FailedPreconditionError(StrCat("the model's tensor '", t.name,
                                                  "' has no counterpart in llama.cpp's ",
                                                  file.arch.name, " architecture"));
    StoredSpan values = t.data;
    if (const int heads = PermutedHeads(config, name); file.arch.permute_qk && heads > 0) {
      permuted.push_back(PermuteHeads(values, heads, t.shape.size() == 2 ? t.shape[1] : 1));
      values = {permuted.back().data(), values.dtype(), values.size()};
    }
    GgmlType stored = t.shape.size() == 1 ? GgmlType::kF32 : type;
    if (stored == GgmlType::kQ8_0 && t.shape.back() % kQ8_0Block != 0) stored = GgmlType::kF16;
    RETURN_IF_ERROR(gguf.AddTensor(name, t.shape, values, stored));
  }
  file.report.architecture = file.arch.name;
  file.report.tensors = gguf.num_tensors();
  RETURN_IF_ERROR(WriteGguf(out, gguf, env));
  return file.report;
}

}  // namespace

absl::Status CheckGgufExport(const fs::path& model_dir) {
  ASSIGN_OR_RETURN(const LlamaConfig config, ReadLlamaConfig(model_dir));
  RETURN_IF_ERROR(ModelMetadata(config, model_dir, GgmlType::kF32).status());
  return LlamaWeights::Check(model_dir).status();
}

absl::StatusOr<GgufExport> ExportWeightsGguf(const LlamaWeights& weights, const fs::path& model_dir,
                                             GgmlType type, const fs::path& out, Env* env) {
  ASSIGN_OR_RETURN(ModelFile file, ModelMetadata(weights.config(), model_dir, type));
  return WriteModel(file, weights, type, out, env);
}

absl::StatusOr<GgufExport> ExportModelGguf(const fs::path& model_dir, const Adapter* adapter,
                                           GgmlType type, const fs::path& out, Env* env) {
  ASSIGN_OR_RETURN(const LlamaConfig config, ReadLlamaConfig(model_dir));
  // A model llama.cpp cannot take is refused before its weights are read.
  ASSIGN_OR_RETURN(ModelFile file, ModelMetadata(config, model_dir, type));
  ASSIGN_OR_RETURN(LlamaWeights weights, LlamaWeights::Read(model_dir));
  if (adapter != nullptr) RETURN_IF_ERROR(weights.Merge(*adapter));
  return WriteModel(file, weights, type, out, env);
}

absl::StatusOr<GgufExport> ExportLoraGguf(const fs::path& model_dir, const Adapter& adapter,
                                          const fs::path& out, Env* env) {
  GgufExport report;
  ASSIGN_OR_RETURN(const LlamaConfig config, ReadLlamaConfig(model_dir));
  ASSIGN_OR_RETURN(const Architecture arch, ArchitectureOf(config, report.notes));
  if (adapter.num_modules() == 0)
    return absl::InvalidArgumentError("the adapter has no modules; there is nothing to export");
  RETURN_IF_ERROR(AdapterSlots(config, adapter).status());  // every module a linear of this model
  Adapter lora = adapter.FoldR();
  // One alpha for the file when every module has PEFT's alpha / r with one r; else each scale
  // goes into its B.
  const LoraModule& first = lora.module(0);
  bool uniform = true;
  for (const LoraModule& m : lora.modules())
    uniform = uniform && m.rank == first.rank && m.scaling == first.scaling;
  float alpha = static_cast<float>(first.scaling * first.rank);
  if (uniform && alpha / static_cast<float>(first.rank) != static_cast<float>(first.scaling))
    uniform = false;  // alpha / r would not give back s in f32
  if (!uniform) {
    alpha = 0;
    for (size_t i = 0; i < lora.num_modules(); ++i) {
      lora.B(i) *= static_cast<float>(lora.module(i).scaling);
      lora.set_scaling(i, 1);
    }
    report.notes.push_back(
        "the modules' scalings differ (rank or alpha patterns, or rsLoRA): each is folded into "
        "its lora_b and adapter.lora.alpha is 0, which llama.cpp applies as a scale of 1");
  }
  GgufWriter gguf;
  gguf.Set("general.architecture", arch.name);
  gguf.Set("general.type", std::string("adapter"));
  gguf.Set("general.name", ModelName(model_dir) + "-lora");
  gguf.Set("adapter.type", std::string("lora"));
  gguf.Set("adapter.lora.alpha", alpha);
  for (size_t i = 0; i < lora.num_modules(); ++i) {
    const LoraModule& m = lora.module(i);
    const std::string base = GgufTensorName(m.name + ".weight");
    const std::span<float> a(lora.A(i).data(), static_cast<size_t>(lora.A(i).size()));
    const std::span<float> b(lora.B(i).data(), static_cast<size_t>(lora.B(i).size()));
    if (const int heads = PermutedHeads(config, base); arch.permute_qk && heads > 0) {
      const std::vector<std::byte> rows = PermuteHeads(b, heads, m.rank);  // B is this copy's
      std::memcpy(b.data(), rows.data(), rows.size());
    }
    RETURN_IF_ERROR(gguf.AddTensor(base + ".lora_a", {m.rank, m.in_features}, a, GgmlType::kF32));
    RETURN_IF_ERROR(gguf.AddTensor(base + ".lora_b", {m.out_features, m.rank}, b, GgmlType::kF32));
  }
  report.architecture = arch.name;
  report.tokenizer = "(none: an adapter)";
  report.tensors = gguf.num_tensors();
  RETURN_IF_ERROR(WriteGguf(out, gguf, env));
  return report;
}

}  // namespace fedlora::common
