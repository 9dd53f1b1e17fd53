// fedlora train: a centralised LoRA or LoRA-SB fine-tuning run that writes a PEFT adapter — the
// baseline a federation is compared with — optionally with DP-SGD at a given budget.
#ifndef FEDLORA_CLIENT_TOOL_TRAIN_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_TRAIN_COMMAND_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/llm/trainer.h"

namespace fedlora::tool {

struct TrainCommandOptions {
  std::string model;            // Hugging Face model directory (required)
  std::string data;             // training JSONL (required)
  std::string out;              // PEFT adapter directory to write (required)
  std::string eval_data;        // held-out JSONL, evaluated before and after; empty: none
  std::string method = "lora";  // "lora", or "lora-sb" (only R trained)
  int rank = 16;
  double alpha = -1;    // lora_alpha; < 0: 2·rank for LoRA, rank for LoRA-SB
  bool rslora = false;  // scale by alpha/√r instead of alpha/r
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  int seq = 256;                    // tokens per record at most
  int init_examples = 64;           // lora-sb: records whose gradient initialises B, A and R
  bool overwrite = false;           // replace `out` if it exists
  bool json = false;                // end with one JSON line of the results
  std::string schedule = "linear";  // after warmup: "linear", "cosine" or "constant"
  double dp_delta = 1e-5;           // DP-SGD: delta of the reported epsilon
  double target_epsilon = -1;       // DP-SGD: > 0 picks the noise multiplier spending it
  common::TrainOptions train;       // the trainer's own (steps or epochs, lr, batch, DP-SGD...)
};

// Trains and writes the adapter; logs progress, prints the result (and the privacy spent).
// Needs train.steps > 0 or train.epochs > 0.
absl::Status Run(const TrainCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_TRAIN_COMMAND_H_
