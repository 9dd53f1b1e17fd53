// fedlora init-model: a randomly initialised Llama-family checkpoint in the Hugging Face layout
// (config.json, model.safetensors, tokenizer.json), with a byte-level BPE tokenizer learned from a
// corpus or another model's tokenizer taken as it is.
#ifndef FEDLORA_CLIENT_TOOL_INIT_MODEL_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_INIT_MODEL_COMMAND_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

struct InitModelCommandOptions {
  std::string preset;      // architecture: a name of common::LlamaPresetNames() (required)
  std::string out;         // model directory to write (required)
  std::string corpus;      // JSONL whose text fields the BPE merges are learned from; empty: none
  std::string tokenizer;   // or a directory to take tokenizer.json (and tokenizer_config.json) from
  uint64_t seed = 0;       // the weights' random seed
  int merges = 0;          // BPE merges to learn (0: bytes only)
  float init_std = 0.02f;  // standard deviation of the linears and embeddings
  std::string dtype = "f32";  // of the stored weights: "f32", "bf16" or "f16"
  bool overwrite = false;     // replace `out` if it exists
};

// Writes the checkpoint atomically and prints what it wrote.
absl::Status Run(const InitModelCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_INIT_MODEL_COMMAND_H_
