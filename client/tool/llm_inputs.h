// What the model commands (eval, generate, train) read: a model's data as examples, and an adapter
// when one is named.
#ifndef FEDLORA_CLIENT_TOOL_LLM_INPUTS_H_
#define FEDLORA_CLIENT_TOOL_LLM_INPUTS_H_

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/llm/trainer.h"
#include "common/tensor/adapter.h"

namespace fedlora::tool {

// The records of the JSONL file `path` as examples of at most `max_length` tokens under `model`'s
// tokenizer; records left with no target token by the cut are kept, with a warning that says how
// many there are and what to do.
absl::StatusOr<std::vector<common::Example>> ReadModelData(const common::Model& model,
                                                           const std::string& path, int max_length);

// The PEFT adapter in `dir`, or none when `dir` is empty.
absl::StatusOr<std::optional<common::Adapter>> ReadAdapterIfNamed(const std::string& dir);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_LLM_INPUTS_H_
