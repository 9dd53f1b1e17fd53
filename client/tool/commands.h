// The subcommands of the offline `fedlora` tool. Each Add*Command registers its subcommand on
// `app`; a failing command prints "error: ..." to stderr and throws CLI::RuntimeError with exit
// code 1, which main turns into the process's exit code (CLI11's own mechanism).
#ifndef FEDLORA_CLIENT_TOOL_COMMANDS_H_
#define FEDLORA_CLIENT_TOOL_COMMANDS_H_

#include <CLI/CLI.hpp>
#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

void AddAggregateCommand(CLI::App& app);
void AddInspectCommand(CLI::App& app);
void AddPrivacyCommand(CLI::App& app);
void AddSummaryCommand(CLI::App& app);
void AddRandomAdapterCommand(CLI::App& app);
// eval, train and init-model.
void AddLlmCommands(CLI::App& app);
void AddTokenizeCommand(CLI::App& app);
void AddExportGgufCommand(CLI::App& app);
void AddExperimentCommand(CLI::App& app);
// Prints what the model in `dir` is (`fedlora inspect --model`).
void InspectModel(const std::string& dir);

// Prints `status` as "error: <message>" and ends the command with exit code 1; does nothing when
// OK.
void ExitIfError(const absl::Status& status);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_COMMANDS_H_
