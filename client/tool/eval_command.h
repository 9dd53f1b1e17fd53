// fedlora eval: the mean cross-entropy of a JSONL file's target tokens under a model (and an
// adapter), and with --accuracy the exact-match accuracy of greedy answers (LLM-Adapters).
#ifndef FEDLORA_CLIENT_TOOL_EVAL_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_EVAL_COMMAND_H_

#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

struct EvalCommandOptions {
  std::string model;        // Hugging Face model directory (required)
  std::string adapter;      // PEFT adapter directory; empty: the base model alone
  std::string data;         // JSONL file: instruction, text or input_ids records (required)
  std::string responses;    // with accuracy: each record's answer, response and verdict (JSONL)
  int max_length = 0;       // tokens per record at most; 0: the model's max_position_embeddings
  int batch = 8;            // records per forward pass
  int threads = 0;          // 0: all cores
  bool accuracy = false;    // also answer every record with an "answer" field and score it
  int max_new_tokens = 32;  // accuracy: tokens per response at most
  bool json = false;        // end with one JSON line of the results
};

// Prints "loss L  perplexity P  over T target tokens in N records" (and the accuracy lines).
absl::Status Run(const EvalCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EVAL_COMMAND_H_
