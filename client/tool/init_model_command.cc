#include "client/tool/init_model_command.h"

#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "client/tool/commands.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/llama.h"
#include "common/llm/tokenizer.h"

namespace fedlora::tool {
namespace {

// The strings of a JSONL corpus: every text, instruction, input and output field.
absl::StatusOr<std::vector<std::string>> CorpusTexts(const std::string& path) {
  std::vector<std::string> texts;
  std::ifstream in(path);
  if (!in) return absl::NotFoundError("cannot read corpus " + path);
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return absl::InvalidArgumentError(
          common::StrCat(path, ":", number, ": expected a JSON object"));
    for (const char* key : {"text", "instruction", "input", "output"})
      if (j.contains(key) && j[key].is_string()) texts.push_back(j[key]);
  }
  return texts;
}

// The tokenizer's files by name: learned here (byte-level BPE), or another model's taken as they
// are (tokenizer.json required, tokenizer_config.json when there is one).
absl::StatusOr<std::map<std::string, std::string>> TokenizerFiles(
    const InitModelCommandOptions& o) {
  std::map<std::string, std::string> files;
  if (o.tokenizer.empty()) {
    std::vector<std::string> texts;
    if (!o.corpus.empty()) {
      ASSIGN_OR_RETURN(texts, CorpusTexts(o.corpus));
    }
    files[common::kTokenizerFile] =
        common::TrainByteLevelTokenizer(texts, o.merges,
                                        {"<|endoftext|>", "<|im_start|>", "<|im_end|>"})
            .dump(2) +
        "\n";
    return files;
  }
  for (const char* name : {common::kTokenizerFile, common::kTokenizerConfigFile}) {
    auto text = common::ReadFileToString(std::filesystem::path(o.tokenizer) / name);
    if (text.ok())
      files[name] = std::move(*text);
    else if (std::string_view(name) == common::kTokenizerFile)
      return text.status();
  }
  return files;
}

// EOS: the tokenizer config's eos_token, else the learned tokenizer's <|endoftext|>.
std::string EosText(const nlohmann::json& tokenizer_config) {
  std::string eos_text = "<|endoftext|>";
  if (tokenizer_config.is_object() && tokenizer_config.contains("eos_token")) {
    const nlohmann::json& e = tokenizer_config["eos_token"];
    if (e.is_string()) eos_text = e.get<std::string>();
    if (e.is_object() && e.value("content", nlohmann::json()).is_string())
      eos_text = e["content"].get<std::string>();
  }
  return eos_text;
}

}  // namespace

absl::Status Run(const InitModelCommandOptions& o) {
  ASSIGN_OR_RETURN(common::LlamaConfig config, common::LlamaPreset(o.preset));
  ASSIGN_OR_RETURN(const auto tokenizer_files, TokenizerFiles(o));
  const auto json_of = [&](const char* name) {
    auto it = tokenizer_files.find(name);
    return it == tokenizer_files.end() ? nlohmann::json()
                                       : nlohmann::json::parse(it->second, nullptr, false);
  };
  const nlohmann::json tokenizer_config = json_of(common::kTokenizerConfigFile);
  ASSIGN_OR_RETURN(
      const common::Tokenizer tokenizer,
      common::Tokenizer::Parse(json_of(common::kTokenizerFile), "the tokenizer", tokenizer_config));
  if (config.vocab_size == 0) config.vocab_size = tokenizer.vocab_size();
  if (tokenizer.vocab_size() > config.vocab_size)
    return absl::InvalidArgumentError(common::StrCat(
        "the tokenizer has ", tokenizer.vocab_size(), " tokens, more than the preset's ",
        config.vocab_size, o.tokenizer.empty() ? "; ask for fewer --merges" : ""));
  const int32_t eos = tokenizer.TokenId(EosText(tokenizer_config));
  config.bos_token_id = tokenizer.bos_id() >= 0 ? tokenizer.bos_id() : eos;
  config.eos_token_ids.clear();
  if (eos >= 0) config.eos_token_ids.push_back(eos);
  ASSIGN_OR_RETURN(const common::DType dtype, common::ParseDType(o.dtype));
  // The weights are made in memory before they are written: refuse what cannot fit.
  ASSIGN_OR_RETURN(const common::ModelSize size, common::ModelSizeOf(config));
  const double bytes = static_cast<double>(size.parameters) * common::DTypeSize(dtype);
  const double memory = static_cast<double>(sysconf(_SC_PHYS_PAGES)) * sysconf(_SC_PAGE_SIZE);
  if (bytes > 0.9 * memory)
    return absl::ResourceExhaustedError(
        common::StrCat("the ", o.preset, " weights take ", bytes / 1e9, " GB in ", o.dtype,
                       ", more than this machine's ", memory / 1e9, " GB of memory allows",
                       dtype == common::DType::kF32 ? "; ask --dtype bf16 (half the size)" : ""));
  const common::LlamaWeights weights =
      common::LlamaWeights::Random(config, o.seed, o.init_std, dtype);
  RETURN_IF_ERROR(common::BuildDirectoryAtomically(
      o.out, o.overwrite, [&](const std::filesystem::path& dir) -> absl::Status {
        RETURN_IF_ERROR(weights.WriteInto(dir));
        for (const auto& [name, text] : tokenizer_files)
          RETURN_IF_ERROR(common::WriteFileSynced(dir / name, text));
        return absl::OkStatus();
      }));
  std::printf("wrote %s: %s preset, %zu parameters in %s, vocabulary %d (%s)\n", o.out.c_str(),
              o.preset.c_str(), weights.num_parameters(), o.dtype.c_str(), config.vocab_size,
              o.tokenizer.empty() ? common::StrCat(o.merges, " merges").c_str()
                                  : ("tokenizer of " + o.tokenizer).c_str());
  return absl::OkStatus();
}

void AddInitModelCommand(CLI::App& app) {
  auto o = std::make_shared<InitModelCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "init-model",
      "Write a randomly initialised Llama checkpoint (config.json, model.safetensors, "
      "byte-level tokenizer.json)");
  cmd->add_option("--preset", o->preset, "architecture: " + common::LlamaPresetNames())
      ->required()
      ->check([](const std::string& name) {
        auto preset = common::LlamaPreset(name);
        return preset.ok() ? std::string() : std::string(preset.status().message());
      });
  cmd->add_option("--out", o->out, "model directory to write")->required();
  cmd->add_flag("--overwrite", o->overwrite, "replace --out if it exists");
  cmd->add_option("--seed", o->seed, "weights' random seed")->capture_default_str();
  cmd->add_option("--init-std", o->init_std, "standard deviation of linears and embeddings")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--dtype", o->dtype, "f32, bf16 or f16: the type the weights are stored in")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  cmd->add_option("--tokenizer-corpus", o->corpus,
                  "JSONL whose text fields the tokenizer's BPE merges are learned from");
  cmd->add_option("--merges", o->merges, "BPE merges to learn (0: bytes only)")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--tokenizer", o->tokenizer,
                  "take tokenizer.json (and tokenizer_config.json) from this directory instead "
                  "of learning one; the vocabulary decides the embedding's size")
      ->excludes("--tokenizer-corpus")
      ->excludes("--merges");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
