#include "client/tool/tokenize_command.h"

#include <fstream>
#include <nlohmann/json.hpp>

#include "client/tool/commands.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/tokenizer.h"

namespace fedlora::tool {

absl::Status Run(const TokenizeCommandOptions& o) {
  if (!o.text && o.input.empty())
    return absl::InvalidArgumentError("tokenize needs --text or --input");
  ASSIGN_OR_RETURN(const common::Tokenizer tokenizer, common::Tokenizer::Read(o.model));
  auto print = [&](const std::string& text) {
    const std::vector<int32_t> ids = tokenizer.Encode(text, o.add_special);
    nlohmann::json line = {{"ids", ids}};
    if (o.show_text) line["text"] = tokenizer.Decode(ids);
    PrintJsonLine(line);
  };
  if (o.text) {
    print(*o.text);
    return absl::OkStatus();
  }
  std::ifstream in(o.input);
  if (!in) return absl::NotFoundError(common::StrCat("cannot read ", o.input));
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (!j.is_string())
      return absl::InvalidArgumentError(
          common::StrCat(o.input, ":", n, ": expected a JSON string, got ", line.substr(0, 80)));
    print(j.get<std::string>());
  }
  return absl::OkStatus();
}

void AddTokenizeCommand(CLI::App& app) {
  auto o = std::make_shared<TokenizeCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize",
      "Token ids of texts under a model's tokenizer, one JSON line {\"ids\": [...]} each");
  cmd->add_option("--model", o->model,
                  "directory with tokenizer.json (and tokenizer_config.json, if the model has one)")
      ->required();
  auto* text = cmd->add_option("--text", o->text, "one text");
  auto* input = cmd->add_option("--input", o->input, "JSONL file of JSON strings, one text a line");
  text->excludes(input);
  cmd->add_flag("--add-special", o->add_special,
                "add the post-processor's special tokens (BOS/EOS) around each text");
  cmd->add_flag("--show-text", o->show_text,
                "also give the ids decoded back to text (\"text\"), to see what round-trips");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
