// fedlora export-gguf: a model (with an adapter merged) or an adapter alone as the GGUF files
// llama.cpp and Ollama load.
#ifndef FEDLORA_CLIENT_TOOL_EXPORT_GGUF_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_EXPORT_GGUF_COMMAND_H_

#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

struct ExportGgufCommandOptions {
  std::string model;          // Hugging Face model directory, the base model (required)
  std::string adapter;        // PEFT adapter directory; empty: the model alone
  std::string out;            // GGUF file to write (required)
  std::string dtype = "f16";  // of the 2-D weights: f32, f16, bf16 or q8_0 (not with lora)
  bool lora = false;          // write the adapter alone as a llama.cpp LoRA adapter
  bool overwrite = false;     // replace `out` if it exists
};

// Writes the file, prints notes on stderr and "wrote OUT: ..." on stdout.
absl::Status Run(const ExportGgufCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPORT_GGUF_COMMAND_H_
