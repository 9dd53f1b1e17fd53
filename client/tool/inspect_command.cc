// fedlora inspect DIR... — what each adapter holds, and whether the adapters can be aggregated
// together.
#include <cstdio>
#include <string>
#include <vector>

#include "client/tool/commands.h"
#include "common/aggregation/aggregate.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {
namespace {

using common::Adapter;

// Prints what `a` holds; false when it holds a non-finite value.
bool PrintAdapter(const Adapter& a) {
  size_t params = 0;
  for (const auto& m : a.modules()) params += m.size();
  std::printf("%s\n  base model: %s\n  modules: %zu, parameters: %zu\n", a.source.c_str(),
              a.base_model.empty() ? "(not named)" : a.base_model.c_str(), a.num_modules(), params);
  absl::Status finite = a.CheckFinite();
  std::printf("  values: %s\n", finite.ok() ? "all finite" : std::string(finite.message()).c_str());
  std::printf("  %-48s %5s %6s %6s %9s %11s %11s %11s\n", "module", "rank", "n", "m", "scaling",
              "|A|", "|B|", "|s*B(R)A|");
  for (size_t i = 0; i < a.num_modules(); ++i) {
    const auto& m = a.module(i);
    std::printf("  %-48s %5d %6d %6d %9.4f %11.4e %11.4e %11.4e%s\n", m.name.c_str(), m.rank,
                m.in_features, m.out_features, m.scaling, a.A(i).norm(), a.B(i).norm(),
                finite.ok() ? a.DeltaNorm(i) : NAN, m.has_r ? "  (has R)" : "");
  }
  return finite.ok();
}

void Run(const std::vector<std::string>& dirs) {
  std::vector<Adapter> adapters;
  bool failed = false;
  for (const std::string& dir : dirs) {
    auto adapter = common::ReadPeftAdapter(dir);
    if (!adapter.ok()) {
      std::printf("%s\n  unreadable: %s\n", dir.c_str(),
                  std::string(adapter.status().message()).c_str());
      failed = true;
      continue;
    }
    if (!PrintAdapter(*adapter)) failed = true;  // readable, but unusable: say so in the exit code
    adapters.push_back(*std::move(adapter));
  }
  if (adapters.size() > 1) {
    std::printf("aggregating these %zu adapters together:\n", adapters.size());
    for (common::Method method : common::kAllMethods) {
      absl::Status st = common::CheckCompatible(adapters, method);
      std::printf("  %-10s %s\n", std::string(common::MethodName(method)).c_str(),
                  st.ok() ? "ok" : ("no: " + std::string(st.message())).c_str());
    }
  }
  if (failed)
    ExitIfError(absl::InvalidArgumentError(
        "some directories are not readable adapters or hold non-finite values (see above)"));
}

}  // namespace

void AddInspectCommand(CLI::App& app) {
  auto dirs = std::make_shared<std::vector<std::string>>();
  auto model = std::make_shared<std::string>();
  CLI::App* cmd =
      app.add_subcommand("inspect",
                         "Show the modules, ranks, scalings and norms of PEFT adapters, and which "
                         "methods can aggregate them together; or, with --model, what a model is");
  cmd->add_option("dirs", *dirs, "PEFT adapter directories");
  cmd->add_option("--model", *model,
                  "a Hugging Face model directory: its family, sizes, LoRA targets, weights and "
                  "whether its tokenizer is supported");
  cmd->callback([dirs, model] {
    if (dirs->empty() && model->empty())
      ExitIfError(absl::InvalidArgumentError("inspect needs adapter directories or --model"));
    if (!model->empty()) InspectModel(*model);
    if (!dirs->empty()) Run(*dirs);
  });
}

}  // namespace fedlora::tool
