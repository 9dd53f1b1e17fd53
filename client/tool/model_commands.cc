// What a user checks before bringing a model to a federation:
//   fedlora inspect --model DIR  — the architecture, its LoRA targets, weights and tokenizer
//   fedlora tokenize             — token ids of texts, as the model's tokenizer makes them
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "client/tool/commands.h"
#include "common/base/strings.h"
#include "common/llm/gguf_export.h"
#include "common/llm/llama.h"
#include "common/llm/tokenizer.h"

namespace fedlora::tool {
namespace {

using common::StrCat;

std::string RopeText(const common::LlamaConfig& c) {
  const common::RopeScaling& r = c.rope_scaling;
  switch (r.type) {
    case common::RopeScaling::Type::kNone:
      return StrCat("theta ", c.rope_theta, ", no scaling");
    case common::RopeScaling::Type::kLinear:
      return StrCat("theta ", c.rope_theta, ", linear scaling by ", r.factor);
    case common::RopeScaling::Type::kDynamic:
      return StrCat("theta ", c.rope_theta, ", dynamic NTK scaling by ", r.factor, " beyond ",
                    c.max_position_embeddings, " positions");
    case common::RopeScaling::Type::kLlama3:
      return StrCat("theta ", c.rope_theta, ", llama3 scaling (factor ", r.factor, ", low ",
                    r.low_freq_factor, ", high ", r.high_freq_factor, ", original context ",
                    r.original_max_position_embeddings, ")");
  }
  return "";
}

std::string AttentionText(const common::LlamaConfig& c) {
  std::string windows;
  int window = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    if (c.window(l) > 0) {
      windows += StrCat(windows.empty() ? "" : ",", l);
      window = c.window(l);
    }
  std::string biases;
  for (int k = 0; k < common::kNumLinearKinds; ++k)
    if (c.bias[k])
      biases += StrCat(biases.empty() ? "" : ", ",
                       common::LinearName(static_cast<common::LinearKind>(k)));
  return StrCat(c.num_attention_heads, " query heads, ", c.num_key_value_heads, " key/value heads",
                ", head_dim ", c.head_dim,
                windows.empty() ? ", full causal"
                                : StrCat(", sliding window of ", window, " on layers ", windows),
                c.qk_norm ? ", RMSNorm on each head of q and k" : "",
                biases.empty() ? ", no biases" : StrCat(", biases on ", biases));
}

// Tensor counts per dtype, and parameters, from the safetensors headers (no weights are read).
absl::StatusOr<std::string> WeightsText(const std::filesystem::path& dir) {
  auto files = common::WeightFiles(dir);
  if (absl::IsNotFound(files.status())) return std::string("no weights (config only)");
  if (!files.ok()) return files.status();
  std::map<std::string, int> dtypes;
  int64_t params = 0;
  for (const auto& f : *files) {
    auto st = common::SafetensorsFile::Open(f);
    if (!st.ok()) return st.status();
    for (const common::TensorInfo& t : st->view().tensors()) {
      ++dtypes[std::string(common::DTypeName(t.dtype))];
      params += t.num_elements();
    }
  }
  std::string text = StrCat(files->size(), files->size() == 1 ? " file, " : " shards, ");
  for (const auto& [dtype, n] : dtypes) text += StrCat(n, " ", dtype, " tensors, ");
  return text + StrCat(params, " parameters");
}

}  // namespace

void InspectModel(const std::string& dir) {
  auto config = common::ReadLlamaConfig(dir);
  ExitIfError(config.status());
  const common::LlamaConfig& c = *config;
  std::printf("%s\n  family: %s (%s)\n", dir.c_str(), c.model_type.c_str(),
              common::ArchitectureName(c.model_type));
  std::printf("  sizes: %d layers, hidden %d, intermediate %d, vocabulary %d, context %d%s\n",
              c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size,
              c.max_position_embeddings,
              c.tie_word_embeddings ? ", LM head tied to the embeddings" : "");
  std::printf("  attention: %s\n  rotary: %s\n", AttentionText(c).c_str(), RopeText(c).c_str());
  auto weights = WeightsText(dir);
  std::printf("  weights: %s\n", weights.ok()
                                     ? weights->c_str()
                                     : StrCat("unreadable: ", weights.status().message()).c_str());
  std::printf("  LoRA targets (PEFT target_modules), per layer [out x in]:\n");
  for (int k = 0; k < common::kNumLinearKinds; ++k) {
    const auto kind = static_cast<common::LinearKind>(k);
    std::printf("    %-10s [%d x %d]  %s\n", common::LinearName(kind), common::LinearOut(c, kind),
                common::LinearIn(c, kind), common::LinearPath(0, kind).c_str());
  }
  if (!std::filesystem::exists(std::filesystem::path(dir) / common::kTokenizerFile)) {
    std::printf("  tokenizer: none (records must be pre-tokenised input_ids)\n");
    return;
  }
  auto tokenizer = common::Tokenizer::Read(dir);
  if (!tokenizer.ok()) {
    std::printf("  tokenizer: NOT SUPPORTED: %s\n",
                std::string(tokenizer.status().message()).c_str());
    return;
  }
  std::string around;
  for (int32_t id : tokenizer->prefix()) around += StrCat(tokenizer->Decode({id}), " ");
  around += "$A";
  for (int32_t id : tokenizer->suffix()) around += StrCat(" ", tokenizer->Decode({id}));
  std::printf("  tokenizer: supported: %s; special tokens per text: %s\n",
              tokenizer->description().c_str(), around.c_str());
  const absl::Status gguf = common::CheckGgufExport(dir);
  std::printf("  llama.cpp (export-gguf): %s\n",
              gguf.ok() ? "can be exported" : ("NO: " + std::string(gguf.message())).c_str());
}

namespace {

struct TokenizeArgs {
  std::string model, text, input;
  bool add_special = false;
  bool show_text = false;
};

void RunTokenize(const TokenizeArgs& a) {
  auto tokenizer = common::Tokenizer::Read(a.model);
  ExitIfError(tokenizer.status());
  auto print = [&](const std::string& text) {
    const std::vector<int32_t> ids = tokenizer->Encode(text, a.add_special);
    nlohmann::json line = {{"ids", ids}};
    if (a.show_text) line["text"] = tokenizer->Decode(ids);
    std::printf("%s\n", line.dump().c_str());
  };
  if (a.input.empty()) {
    print(a.text);
    return;
  }
  std::ifstream in(a.input);
  if (!in) ExitIfError(absl::NotFoundError(StrCat("cannot read ", a.input)));
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_string())
      ExitIfError(absl::InvalidArgumentError(
          StrCat(a.input, ":", n, ": expected a JSON string, got ", line.substr(0, 80))));
    print(j.get<std::string>());
  }
}

}  // namespace

void AddTokenizeCommand(CLI::App& app) {
  auto a = std::make_shared<TokenizeArgs>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize",
      "Token ids of texts under a model's tokenizer, one JSON line {\"ids\": [...]} each");
  cmd->add_option("--model", a->model,
                  "directory with tokenizer.json (and tokenizer_config.json, if the model has one)")
      ->required();
  auto* text = cmd->add_option("--text", a->text, "one text");
  auto* input = cmd->add_option("--input", a->input, "JSONL file of JSON strings, one text a line");
  text->excludes(input);
  cmd->add_flag("--add-special", a->add_special,
                "add the post-processor's special tokens (BOS/EOS) around each text");
  cmd->add_flag("--show-text", a->show_text,
                "also give the ids decoded back to text (\"text\"), to see what round-trips");
  cmd->callback([a, text, input] {
    if (text->count() == 0 && input->count() == 0)
      ExitIfError(absl::InvalidArgumentError("tokenize needs --text or --input"));
    RunTokenize(*a);
  });
}

}  // namespace fedlora::tool
