// fedlora generate: continues prompts under a model and adapter, greedy or sampled, over a KV cache
// (common/llm/decoder.h).
#ifndef FEDLORA_CLIENT_TOOL_GENERATE_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_GENERATE_COMMAND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/llm/decoder.h"

namespace fedlora::tool {

struct GenerateCommandOptions {
  std::string model;                 // Hugging Face model directory with a tokenizer (required)
  std::string adapter;               // PEFT adapter directory; empty: the base model alone
  std::vector<std::string> prompts;  // texts to continue
  std::string data;  // or a JSONL file: each instruction record's prompt, or a text record's text
  common::SamplingOptions sampling;  // max_new_tokens 32, greedy (temperature 0), top_p 1
  uint64_t seed = 0;                 // sampling: prompt i uses seed + i
  int top_probs = 0;                 // with json: each step's K most probable next tokens
  int threads = 0;                   // 0: all cores
  bool json = false;                 // one JSON line per prompt instead of the text
};

// Prints each prompt followed by its continuation (or, with json, prompt, prompt_ids, ids, text
// and top). Needs prompts or data.
absl::Status Run(const GenerateCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_GENERATE_COMMAND_H_
