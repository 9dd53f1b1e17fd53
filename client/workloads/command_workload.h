// The `command` workload: a site's own training program (for sites that train on GPUs with their
// own stack) stands in for the built-in trainer. For each task the node writes, under
// --work-dir/round-<t>/:
//   start/     the PEFT adapter to start from (lora_A, lora_B, and lora_R for fed-sb);
//   task.json  {"round", "method", "rank", "lora_alpha", "local_steps", "learning_rate", "seed",
//              "modules", "deltas"}, where "deltas" lists, in order, the PEFT directories of every
//              FLoRA round delta the base must hold merged (the program merges them into its copy
//              of the base);
// and runs the command as `/bin/sh -c COMMAND` (the command is one argument of the shell, as
// given; its stdin, stdout and stderr are the client's) with these in its environment, the paths
// never spliced into the command's text:
//   FEDLORA_START_DIR  the start/ directory above
//   FEDLORA_OUT_DIR    an empty directory for the trained adapter
//   FEDLORA_TASK_JSON  the task.json above
// The program writes its trained PEFT adapter to $FEDLORA_OUT_DIR (same modules and rank; for
// fed-sb only lora_R is taken) and $FEDLORA_OUT_DIR/metrics.json:
//   {"loss_before": x, "loss_after": y[, "num_examples": n]}
// where n, when given, is the number of examples trained on this round: the update's aggregation
// weight (otherwise the --examples the client joined with). A non-zero exit fails the task.
#ifndef FEDLORA_CLIENT_WORKLOADS_COMMAND_WORKLOAD_H_
#define FEDLORA_CLIENT_WORKLOADS_COMMAND_WORKLOAD_H_

#include <filesystem>
#include <string>
#include <vector>

#include "client/workloads/workload.h"

namespace fedlora::client {

struct CommandOptions {
  std::string command;                  // run by /bin/sh -c (required)
  std::string base_model_sha256;        // the site's base model fingerprint
  std::vector<v1::ModuleSpec> modules;  // its adaptable layers
  int64_t examples = 0;
  std::filesystem::path work_dir = "fedlora-work";
};

// Parses "name:n:m,name:n:m" (n = in_features, m = out_features).
absl::StatusOr<std::vector<v1::ModuleSpec>> ParseModuleList(const std::string& text);

class CommandWorkload final : public Workload {
 public:
  explicit CommandWorkload(CommandOptions options)
      : options_(std::move(options)), examples_(options_.examples) {}
  std::string fingerprint() const override { return options_.base_model_sha256; }
  // --examples until a round's metrics.json gives its own count.
  int64_t num_examples() const override { return examples_; }
  std::vector<v1::ModuleSpec> modules() const override { return options_.modules; }
  absl::StatusOr<v1::TrainMetrics> Train(const v1::Task& task, common::Adapter& adapter) override;
  absl::Status MergeIntoBase(const common::Adapter& delta) override;
  absl::Status WriteFinalState(const std::filesystem::path& dir) const override;

 private:
  CommandOptions options_;
  int64_t examples_;
  std::vector<std::string> deltas_;  // PEFT directories of the merged FLoRA deltas, in order
};

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_WORKLOADS_COMMAND_WORKLOAD_H_
