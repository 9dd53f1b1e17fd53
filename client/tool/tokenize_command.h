// fedlora tokenize: the token ids of texts under a model's tokenizer, as the model's data is
// encoded, to check a tokenizer before bringing its model to a federation.
#ifndef FEDLORA_CLIENT_TOOL_TOKENIZE_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_TOKENIZE_COMMAND_H_

#include <optional>
#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

struct TokenizeCommandOptions {
  std::string model;                // directory with tokenizer.json (required)
  std::optional<std::string> text;  // one text (it may be empty)
  std::string input;                // or a JSONL file of JSON strings, one text a line
  bool add_special = false;         // add the post-processor's special tokens (BOS/EOS)
  bool show_text = false;           // also decode the ids back to text
};

// Prints one JSON line {"ids": [...]} (and "text") per text. Needs text or input.
absl::Status Run(const TokenizeCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_TOKENIZE_COMMAND_H_
