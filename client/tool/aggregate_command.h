// fedlora aggregate --method M --out DIR [--weights w1,w2,...] [--lambda L] IN_DIR...: PEFT LoRA
// adapters aggregated into one adapter directory with FedIT, FLoRA, LoRA-FAIR or Fed-SB, with the
// aggregation error against the ideal ΔW* = Σ p_k B_k A_k per module.
#ifndef FEDLORA_CLIENT_TOOL_AGGREGATE_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_AGGREGATE_COMMAND_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/aggregation/lora_fair.h"

namespace fedlora::tool {

struct AggregateCommandOptions {
  std::string method;                 // fedit | flora | lora-fair | fed-sb (required)
  std::string out;                    // output adapter directory, written atomically (required)
  std::vector<std::string> inputs;    // PEFT adapter directories, one per client (required)
  std::vector<double> weights;        // one per input, normalised to sum 1; empty: uniform
  common::LoraFairOptions lora_fair;  // lora-fair: lambda, tolerance, max_iterations
  std::string dtype = "f32";          // element type of the written tensors: f32 | f16 | bf16
  bool force = false;                 // replace `out` if it exists
  bool json = false;                  // end with a JSON line holding the per-module report
};

// Aggregates, writes the adapter and prints the summary.
absl::Status Run(const AggregateCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_AGGREGATE_COMMAND_H_
