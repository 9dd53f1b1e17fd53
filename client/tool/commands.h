// The subcommands of the offline `fedlora` tool, one file each (<name>_command.{h,cc}): an options
// struct, `absl::Status Run(const <Name>CommandOptions&)` that does the work, and the Add*Command
// below that registers it on `app` with CLI11, fills the options from the flags and calls Run. A
// failing command prints "error: <message>" to stderr and throws CLI::RuntimeError with exit code
// 1, which main turns into the process's exit code (CLI11's own mechanism).
#ifndef FEDLORA_CLIENT_TOOL_COMMANDS_H_
#define FEDLORA_CLIENT_TOOL_COMMANDS_H_

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/status/status.h"

namespace fedlora::tool {

// Adapters: aggregate, inspect, random-adapter.
void AddAggregateCommand(CLI::App& app);
void AddInspectCommand(CLI::App& app);
void AddRandomAdapterCommand(CLI::App& app);
// Privacy budgets and coordinator runs: privacy, summary.
void AddPrivacyCommand(CLI::App& app);
void AddSummaryCommand(CLI::App& app);
// Models and data: make-data, init-model, tokenize, eval, generate, train, merge, export-gguf.
void AddMakeDataCommand(CLI::App& app);
void AddInitModelCommand(CLI::App& app);
void AddTokenizeCommand(CLI::App& app);
void AddEvalCommand(CLI::App& app);
void AddGenerateCommand(CLI::App& app);
void AddTrainCommand(CLI::App& app);
void AddMergeCommand(CLI::App& app);
void AddExportGgufCommand(CLI::App& app);
// Certificates of a federation: certs init, request, sign, revoke.
void AddCertsCommand(CLI::App& app);
// Grids of federations: experiment.
void AddExperimentCommand(CLI::App& app);

// Prints `status` as "error: <message>" and ends the command with exit code 1; does nothing when
// OK.
void ExitIfError(const absl::Status& status);

// Prints `j` as one line of JSON on stdout (a command's --json summary).
void PrintJsonLine(const nlohmann::json& j);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_COMMANDS_H_
