// fedlora inspect: what PEFT adapters hold (modules, ranks, scalings, norms) and whether they can
// be aggregated together; with --model, what a model is (family, sizes, LoRA targets, weights,
// tokenizer, whether llama.cpp can take it) — what a user checks before bringing it to a
// federation.
#ifndef FEDLORA_CLIENT_TOOL_INSPECT_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_INSPECT_COMMAND_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace fedlora::tool {

struct InspectCommandOptions {
  std::vector<std::string> dirs;  // PEFT adapter directories
  std::string model;              // a Hugging Face model directory; empty: none
};

// Prints the model, then the adapters. Needs dirs or a model; an adapter that is unreadable or
// holds a non-finite value makes it an error, after everything is printed.
absl::Status Run(const InspectCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_INSPECT_COMMAND_H_
