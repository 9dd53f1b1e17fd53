// fedlora merge: a model with an adapter folded into its weights, written as a model directory.
#ifndef FEDLORA_CLIENT_TOOL_MERGE_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_MERGE_COMMAND_H_

#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

struct MergeCommandOptions {
  std::string model;       // Hugging Face model directory (required)
  std::string adapter;     // PEFT adapter directory (required)
  std::string out;         // model directory to write (required)
  std::string dtype;       // of the written weights: "f32", "bf16" or "f16"; empty: the model's
  bool overwrite = false;  // replace `out` if it exists
};

// Writes W0 + s·B·A per adapted module; the tokenizer and the model's other files travel along.
absl::Status Run(const MergeCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_MERGE_COMMAND_H_
