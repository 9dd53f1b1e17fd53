#include "client/tool/random_adapter_command.h"

#include <cmath>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "client/tool/commands.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/llama_config.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {

absl::Status Run(const RandomAdapterCommandOptions& args) {
  ASSIGN_OR_RETURN(const common::DType dtype, common::ParseDType(args.dtype));
  ASSIGN_OR_RETURN(const std::vector<common::LinearKind> kinds,
                   common::ParseLinearKinds(args.targets));
  std::optional<common::LlamaConfig> config;
  if (!args.model.empty()) {
    ASSIGN_OR_RETURN(config, common::ReadLlamaConfig(args.model));
  }
  std::vector<common::ModuleShape> shapes;
  for (int layer = 0; layer < (config ? config->num_hidden_layers : args.layers); ++layer) {
    for (common::LinearKind kind : kinds) {
      common::ModuleShape s;
      s.name = common::LinearPath(layer, kind);
      s.rank = args.rank;
      s.in_features = config ? common::LinearIn(*config, kind) : args.in_features;
      s.out_features = config ? common::LinearOut(*config, kind) : args.out_features;
      s.scaling = common::LoraScaling(args.alpha, args.rank, args.rslora);
      s.has_r = args.lora_sb;
      shapes.push_back(std::move(s));
    }
  }
  auto adapter = common::Adapter::Create(shapes);
  if (!adapter.ok()) return adapter.status();
  adapter->base_model = args.base_model;
  // A ~ U(−1/√n, 1/√n) as PEFT's kaiming_uniform(a=√5) draws it; B ~ N(0, --b-std², 0.02 by
  // default) stands in for a trained B. For LoRA-SB, B and A come from --frozen-seed (shared by all
  // clients) with orthonormal columns/rows, R from --seed.
  std::mt19937_64 rng(args.seed), frozen_rng(args.frozen_seed);
  for (size_t i = 0; i < adapter->num_modules(); ++i) {
    std::normal_distribution<float> normal(0.0f, args.b_std);
    const common::LoraModule& m = adapter->module(i);
    if (args.lora_sb) {
      adapter->B(i) =
          common::RandomOrthonormal(m.out_features, args.rank, frozen_rng).cast<float>();
      adapter->A(i) =
          common::RandomOrthonormal(m.in_features, args.rank, frozen_rng).transpose().cast<float>();
      for (float& x : adapter->R(i).reshaped()) x = normal(rng);
    } else {
      common::InitLoraA(adapter->A(i), rng);
      for (float& x : adapter->B(i).reshaped()) x = normal(rng);
    }
  }
  RETURN_IF_ERROR(common::WritePeftAdapter(*adapter, args.out, {dtype, false}));
  std::printf("wrote %s: %zu modules, rank %d\n", args.out.c_str(), adapter->num_modules(),
              args.rank);
  return absl::OkStatus();
}

void AddRandomAdapterCommand(CLI::App& app) {
  auto args = std::make_shared<RandomAdapterCommandOptions>();
  CLI::App* cmd = app.add_subcommand("random-adapter",
                                     "Write a PEFT adapter with random factors (for trying out "
                                     "and benchmarking aggregation)");
  cmd->add_option("--out", args->out, "output adapter directory")->required();
  auto* layers = cmd->add_option("--layers", args->layers, "decoder layers")->capture_default_str();
  cmd->add_option("--targets", args->targets, "adapted projections")
      ->delimiter(',')
      ->allow_extra_args(false)
      ->capture_default_str();
  auto* in = cmd->add_option("--in-features", args->in_features, "n of every adapted layer")
                 ->capture_default_str();
  auto* out = cmd->add_option("--out-features", args->out_features, "m of every adapted layer")
                  ->capture_default_str();
  cmd->add_option("--model", args->model,
                  "Hugging Face model directory whose config.json gives the layers and each "
                  "target's shape")
      ->excludes(layers)
      ->excludes(in)
      ->excludes(out);
  cmd->add_option("--b-std", args->b_std, "standard deviation of B (R for --lora-sb)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  cmd->add_option("--rank", args->rank, "r")->capture_default_str();
  cmd->add_option("--alpha", args->alpha, "lora_alpha")->capture_default_str();
  cmd->add_flag("--rslora", args->rslora, "scaling alpha/sqrt(r) instead of alpha/r");
  cmd->add_flag("--lora-sb", args->lora_sb, "LoRA-SB adapter (B·R·A with orthonormal frozen B, A)");
  cmd->add_option("--seed", args->seed, "seed of the trained factors")->capture_default_str();
  cmd->add_option("--frozen-seed", args->frozen_seed,
                  "seed of LoRA-SB's frozen B and A (share it across clients)")
      ->capture_default_str();
  cmd->add_option("--base-model", args->base_model, "base_model_name_or_path to record");
  cmd->add_option("--dtype", args->dtype, "f32 | f16 | bf16")->capture_default_str();
  cmd->callback([args] { ExitIfError(Run(*args)); });
}

}  // namespace fedlora::tool
