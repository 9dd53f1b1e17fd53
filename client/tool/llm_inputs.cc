#include "client/tool/llm_inputs.h"

#include <spdlog/spdlog.h>

#include "common/base/status_macros.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {

absl::StatusOr<std::vector<common::Example>> ReadModelData(const common::Model& model,
                                                           const std::string& path,
                                                           int max_length) {
  ASSIGN_OR_RETURN(std::vector<common::Example> examples,
                   common::ReadExamples(path, model.tokens, max_length));
  size_t without_targets = 0;
  for (const common::Example& e : examples) without_targets += common::TargetCount(e) == 0;
  if (without_targets > 0)
    spdlog::warn(
        "{} of {} records of {} have no target tokens within {} tokens (a longer maximum length "
        "keeps their responses)",
        without_targets, examples.size(), path, max_length);
  return examples;
}

absl::StatusOr<std::optional<common::Adapter>> ReadAdapterIfNamed(const std::string& dir) {
  if (dir.empty()) return std::nullopt;
  ASSIGN_OR_RETURN(common::Adapter adapter, common::ReadPeftAdapter(dir));
  return adapter;
}

}  // namespace fedlora::tool
