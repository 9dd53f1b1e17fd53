#include "client/tool/aggregate_command.h"

#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "client/tool/commands.h"
#include "common/aggregation/aggregate.h"
#include "common/base/status_macros.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {

using common::Adapter;

absl::Status Run(const AggregateCommandOptions& args) {
  const auto start = std::chrono::steady_clock::now();
  ASSIGN_OR_RETURN(const common::Method method, common::ParseMethod(args.method));
  ASSIGN_OR_RETURN(const common::DType dtype, common::ParseDType(args.dtype));
  std::vector<Adapter> clients;
  for (const std::string& dir : args.inputs) {
    ASSIGN_OR_RETURN(Adapter adapter, common::ReadPeftAdapter(dir));
    clients.push_back(std::move(adapter));
  }
  for (const Adapter& c : clients) {
    if (c.base_model != clients[0].base_model) {
      spdlog::warn("{} names base model '{}' but {} names '{}'", c.source, c.base_model,
                   clients[0].source, clients[0].base_model);
    }
  }
  common::AggregateOptions options{method, args.lora_fair};
  auto result = common::Aggregate(clients, args.weights, options);
  if (!result.ok()) return result.status();
  const double aggregate_seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  RETURN_IF_ERROR(common::WritePeftAdapter(result->adapter, args.out, {dtype, args.force}));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  // Summary: the aggregation error against the ideal ΔW* = Σ p_k B_k A_k, worst module; LoRA-FAIR's
  // objective.
  double max_error = 0, max_objective = 0, max_fedit = 0, max_grad = 0;
  int max_iterations = 0, rank = 0, converged = 0;
  nlohmann::json modules = nlohmann::json::array();
  for (const common::ModuleReport& m : result->modules) {
    max_error = std::max(max_error, m.relative_error);
    rank = std::max(rank, m.rank);
    nlohmann::json row = {{"module", m.name},
                          {"rank", m.rank},
                          {"target_norm", m.target_norm},
                          {"relative_error", m.relative_error}};
    if (method == common::Method::kLoraFair) {
      const auto& f = m.lora_fair;
      max_objective = std::max(max_objective, f.objective);
      max_fedit = std::max(max_fedit, f.fedit_objective);
      max_grad = std::max(max_grad, f.gradient_norm);
      max_iterations = std::max(max_iterations, f.iterations);
      converged += f.converged;
      row.update({{"objective", f.objective},
                  {"fedit_objective", f.fedit_objective},
                  {"gradient_norm", f.gradient_norm},
                  {"iterations", f.iterations},
                  {"converged", f.converged}});
    }
    modules.push_back(std::move(row));
  }
  std::printf("aggregated %zu adapters with %s: %zu modules, rank %d, written to %s in %.3f s\n",
              clients.size(), args.method.c_str(), result->modules.size(), rank, args.out.c_str(),
              seconds);
  std::printf(
      "  aggregation error |dW - dW*|/|dW*|: max %.3e over modules (dW* = sum_k p_k s_k B_k A_k)\n",
      max_error);
  if (method == common::Method::kLoraFair) {
    std::printf(
        "  lora-fair objective: max %.9f (FedIT's %.9f), lambda %g, %d/%zu modules converged, "
        "max %d iterations, max gradient norm %.2e\n",
        max_objective, max_fedit, args.lora_fair.lambda, converged, result->modules.size(),
        max_iterations, max_grad);
  }
  if (args.json) {
    nlohmann::json summary = {{"method", args.method},
                              {"clients", clients.size()},
                              {"out", args.out},
                              {"rank", rank},
                              {"seconds", seconds},
                              {"aggregate_seconds", aggregate_seconds},
                              {"max_relative_error", max_error},
                              {"modules", modules}};
    PrintJsonLine(summary);
  }
  return absl::OkStatus();
}

void AddAggregateCommand(CLI::App& app) {
  auto args = std::make_shared<AggregateCommandOptions>();
  CLI::App* cmd =
      app.add_subcommand("aggregate", "Aggregate PEFT LoRA adapters into one adapter directory");
  cmd->add_option("--method", args->method, "fedit | flora | lora-fair | fed-sb")->required();
  cmd->add_option("--out", args->out,
                  "output adapter directory (written atomically; must not exist)")
      ->required();
  cmd->add_option("--weights", args->weights,
                  "one weight per input (e.g. example counts), normalised to sum 1; "
                  "uniform when omitted")
      ->delimiter(',')
      ->allow_extra_args(false);
  cmd->add_option("--lambda", args->lora_fair.lambda, "lora-fair: weight of |dB|^2")
      ->capture_default_str();
  cmd->add_option("--tolerance", args->lora_fair.tolerance,
                  "lora-fair: stop when |grad| * |B_bar| is below this")
      ->capture_default_str();
  cmd->add_option("--max-iterations", args->lora_fair.max_iterations,
                  "lora-fair: L-BFGS iterations at most")
      ->capture_default_str();
  cmd->add_option("--dtype", args->dtype, "f32 | f16 | bf16: element type of the written tensors")
      ->capture_default_str();
  cmd->add_flag("--force", args->force, "replace --out if it exists");
  cmd->add_flag("--json", args->json, "end with a JSON line holding the per-module report");
  cmd->add_option("inputs", args->inputs, "PEFT adapter directories, one per client")->required();
  cmd->callback([args] { ExitIfError(Run(*args)); });
}

}  // namespace fedlora::tool
