// fedlora: the offline tool. Aggregates PEFT adapters with FedIT, FLoRA, LoRA-FAIR or Fed-SB,
// inspects them, computes privacy budgets, writes random adapters for trying things out, and
// evaluates and trains adapters of Llama-family models (eval, train, generate, init-model), and
// exports models and adapters for llama.cpp (export-gguf).
// `fedlora --help` and `fedlora COMMAND --help` say more.
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include <cstdio>

#include "client/tool/commands.h"

namespace fedlora::tool {

void ExitIfError(const absl::Status& status) {
  if (status.ok()) return;
  std::fprintf(stderr, "error: %s\n", std::string(status.message()).c_str());
  throw CLI::RuntimeError(1);
}

void PrintJsonLine(const nlohmann::json& j) { std::printf("%s\n", j.dump().c_str()); }

}  // namespace fedlora::tool

int main(int argc, char** argv) {
  // Logs go to stderr; stdout carries only the commands' results, so it can be piped.
  spdlog::set_default_logger(spdlog::stderr_color_mt("fedlora"));
  spdlog::set_pattern("%Y-%m-%dT%H:%M:%S.%e %^%l%$ %v");
  CLI::App app{"fedlora: federated LoRA fine-tuning, offline tools"};
  app.require_subcommand(1);
  // In the order `fedlora --help` has always listed them.
  fedlora::tool::AddAggregateCommand(app);
  fedlora::tool::AddInspectCommand(app);
  fedlora::tool::AddPrivacyCommand(app);
  fedlora::tool::AddSummaryCommand(app);
  fedlora::tool::AddRandomAdapterCommand(app);
  fedlora::tool::AddMakeDataCommand(app);
  fedlora::tool::AddMergeCommand(app);
  fedlora::tool::AddEvalCommand(app);
  fedlora::tool::AddGenerateCommand(app);
  fedlora::tool::AddTrainCommand(app);
  fedlora::tool::AddInitModelCommand(app);
  fedlora::tool::AddTokenizeCommand(app);
  fedlora::tool::AddExportGgufCommand(app);
  fedlora::tool::AddExperimentCommand(app);
  fedlora::tool::AddCertsCommand(app);
  CLI11_PARSE(app, argc, argv);
  return 0;
}
