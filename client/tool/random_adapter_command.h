// fedlora random-adapter — writes a PEFT adapter with random factors, shaped like a Llama-family
// model's attention and MLP projections, for trying out and benchmarking aggregation without
// training anything.
#ifndef FEDLORA_CLIENT_TOOL_RANDOM_ADAPTER_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_RANDOM_ADAPTER_COMMAND_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace fedlora::tool {

struct RandomAdapterCommandOptions {
  std::string out;  // output adapter directory (required)
  int layers = 2;   // decoder layers
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  int in_features = 64;   // n of every adapted layer
  int out_features = 64;  // m of every adapted layer
  int rank = 8;
  double alpha = 16;          // lora_alpha
  bool rslora = false;        // scaling alpha/√r instead of alpha/r
  bool lora_sb = false;       // B·R·A with orthonormal frozen B and A
  uint64_t seed = 1;          // of the trained factors (A and B; R for lora_sb)
  uint64_t frozen_seed = 0;   // of LoRA-SB's frozen B and A (shared across clients)
  std::string base_model;     // base_model_name_or_path to record
  std::string dtype = "f32";  // f32 | f16 | bf16
  std::string model;          // a model directory whose config.json gives layers and shapes instead
  float b_std = 0.02f;        // standard deviation of B (R for lora_sb)
};

// Writes the adapter and prints "wrote DIR: N modules, rank r".
absl::Status Run(const RandomAdapterCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_RANDOM_ADAPTER_COMMAND_H_
