#include "client/tool/merge_command.h"

#include <cstdio>

#include "client/tool/commands.h"
#include "common/base/status_macros.h"
#include "common/llm/llama.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {

absl::Status Run(const MergeCommandOptions& o) {
  ASSIGN_OR_RETURN(common::LlamaWeights weights, common::LlamaWeights::Read(o.model));
  ASSIGN_OR_RETURN(const common::Adapter adapter, common::ReadPeftAdapter(o.adapter));
  std::optional<common::DType> dtype;
  if (!o.dtype.empty()) {
    ASSIGN_OR_RETURN(dtype, common::ParseDType(o.dtype));
  }
  RETURN_IF_ERROR(weights.Merge(adapter, dtype));
  RETURN_IF_ERROR(weights.WriteModelDirectory(o.out, o.model, dtype, o.overwrite));
  std::printf("wrote %s: %s with %zu adapter modules merged\n", o.out.c_str(), o.model.c_str(),
              adapter.num_modules());
  return absl::OkStatus();
}

void AddMergeCommand(CLI::App& app) {
  auto o = std::make_shared<MergeCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "merge", "Fold an adapter into a model's weights and write the merged model");
  cmd->add_option("--model", o->model, "Hugging Face model directory")->required();
  cmd->add_option("--adapter", o->adapter, "PEFT adapter directory")->required();
  cmd->add_option("--out", o->out, "model directory to write")->required();
  cmd->add_option("--dtype", o->dtype, "f32, bf16 or f16 (default: the model's own type)")
      ->check(CLI::IsMember({"f32", "bf16", "f16"}));
  cmd->add_flag("--overwrite", o->overwrite, "replace --out if it exists");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
