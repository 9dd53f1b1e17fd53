// fedlora summary STATE_DIR... — one line per coordinator run, from its metrics.jsonl: the global
// model's loss (held-out, when the coordinator evaluated one; else on the clients' data) at the
// first and last round, the last mean training loss, bytes per client per round and wall time;
// then, for runs with held-out loss, that loss round by round, and for private runs the ε spent.
#ifndef FEDLORA_CLIENT_TOOL_SUMMARY_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_SUMMARY_COMMAND_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace fedlora::tool {

struct SummaryCommandOptions {
  std::vector<std::string> dirs;  // fedlora-server --state-dir directories (required)
  std::string out;                // also write the table to this file; empty: stdout only
};

// Prints the table (read through common/run's typed records).
absl::Status Run(const SummaryCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_SUMMARY_COMMAND_H_
