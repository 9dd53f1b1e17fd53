#include "client/tool/inspect_command.h"

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "client/tool/commands.h"
#include "common/aggregation/aggregate.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/gguf_export.h"
#include "common/llm/llama.h"
#include "common/llm/tokenizer.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {
namespace {

using common::Adapter;
using common::StrCat;

std::string RopeText(const common::LlamaConfig& c) {
  const common::RopeScaling& r = c.rope_scaling;
  switch (r.type) {
    case common::RopeScaling::Type::kNone:
      return StrCat("theta ", c.rope_theta, ", no scaling");
    case common::RopeScaling::Type::kLinear:
      return StrCat("theta ", c.rope_theta, ", linear scaling by ", r.factor);
    case common::RopeScaling::Type::kDynamic:
      return StrCat("theta ", c.rope_theta, ", dynamic NTK scaling by ", r.factor, " beyond ",
                    c.max_position_embeddings, " positions");
    case common::RopeScaling::Type::kLlama3:
      return StrCat("theta ", c.rope_theta, ", llama3 scaling (factor ", r.factor, ", low ",
                    r.low_freq_factor, ", high ", r.high_freq_factor, ", original context ",
                    r.original_max_position_embeddings, ")");
  }
  return "";
}

std::string AttentionText(const common::LlamaConfig& c) {
  std::string windows;
  int window = 0;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    if (c.window(l) > 0) {
      windows += StrCat(windows.empty() ? "" : ",", l);
      window = c.window(l);
    }
  std::string biases;
  for (int k = 0; k < common::kNumLinearKinds; ++k)
    if (c.bias[k])
      biases += StrCat(biases.empty() ? "" : ", ",
                       common::LinearName(static_cast<common::LinearKind>(k)));
  return StrCat(c.num_attention_heads, " query heads, ", c.num_key_value_heads, " key/value heads",
                ", head_dim ", c.head_dim,
                windows.empty() ? ", full causal"
                                : StrCat(", sliding window of ", window, " on layers ", windows),
                c.qk_norm ? ", RMSNorm on each head of q and k" : "",
                biases.empty() ? ", no biases" : StrCat(", biases on ", biases));
}

// Tensor counts per dtype, and parameters, from the safetensors headers (no weights are read).
absl::StatusOr<std::string> WeightsText(const std::vector<std::filesystem::path>& files) {
  std::map<std::string, int> dtypes;
  int64_t params = 0;
  for (const auto& f : files) {
    auto st = common::SafetensorsFile::Open(f);
    if (!st.ok()) return st.status();
    for (const common::TensorInfo& t : st->view().tensors()) {
      ++dtypes[std::string(common::DTypeName(t.dtype))];
      params += t.num_elements();
    }
  }
  std::string text = StrCat(files.size(), files.size() == 1 ? " file, " : " shards, ");
  for (const auto& [dtype, n] : dtypes) text += StrCat(n, " ", dtype, " tensors, ");
  return text + StrCat(params, " parameters");
}

// The weights line: what the safetensors headers hold, when it is the model config.json describes
// (what every command that loads the model checks first); else why not, and false.
bool PrintWeights(const std::string& dir) {
  auto files = common::WeightFiles(dir);
  if (absl::IsNotFound(files.status())) {
    std::printf("  weights: none (config only)\n");
    return true;
  }
  absl::Status usable = common::LlamaWeights::Check(dir).status();
  absl::StatusOr<std::string> text = usable.ok() ? WeightsText(*files) : usable;
  if (!text.ok()) {
    std::printf("  weights: NOT USABLE: %s\n", std::string(text.status().message()).c_str());
    return false;
  }
  std::printf("  weights: %s, as config.json says\n", text->c_str());
  return true;
}

// --model: what the model in `dir` is. An unreadable config.json is an error, and so are weights
// that config.json does not describe (after the rest is printed); a tokenizer or an export that
// cannot be done is printed.
absl::Status InspectModel(const std::string& dir) {
  ASSIGN_OR_RETURN(const common::LlamaConfig c, common::ReadLlamaConfig(dir));
  ASSIGN_OR_RETURN(const common::ModelSize size, common::ModelSizeOf(c));
  std::printf("%s\n  family: %s (%s)\n", dir.c_str(), c.model_type.c_str(),
              common::ArchitectureName(c.model_type));
  std::printf("  sizes: %d layers, hidden %d, intermediate %d, vocabulary %d, context %d%s\n",
              c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size,
              c.max_position_embeddings,
              c.tie_word_embeddings ? ", LM head tied to the embeddings" : "");
  std::printf("  attention: %s\n  rotary: %s\n", AttentionText(c).c_str(), RopeText(c).c_str());
  std::printf("  parameters: %lld, %lld bytes as f32\n", static_cast<long long>(size.parameters),
              static_cast<long long>(size.f32_bytes));
  const absl::Status weights =
      PrintWeights(dir)
          ? absl::OkStatus()
          : absl::InvalidArgumentError(
                StrCat("the weights in ", dir, " are not usable with its config.json (see above)"));
  std::printf("  LoRA targets (PEFT target_modules), per layer [out x in]:\n");
  for (int k = 0; k < common::kNumLinearKinds; ++k) {
    const auto kind = static_cast<common::LinearKind>(k);
    std::printf("    %-10s [%d x %d]  %s\n", common::LinearName(kind), common::LinearOut(c, kind),
                common::LinearIn(c, kind), common::LinearPath(0, kind).c_str());
  }
  if (!std::filesystem::exists(std::filesystem::path(dir) / common::kTokenizerFile)) {
    std::printf("  tokenizer: none (records must be pre-tokenised input_ids)\n");
    return weights;
  }
  auto tokenizer = common::Tokenizer::Read(dir);
  if (!tokenizer.ok()) {
    std::printf("  tokenizer: NOT SUPPORTED: %s\n",
                std::string(tokenizer.status().message()).c_str());
    return weights;
  }
  std::string around;
  for (int32_t id : tokenizer->prefix()) around += StrCat(tokenizer->Decode({id}), " ");
  around += "$A";
  for (int32_t id : tokenizer->suffix()) around += StrCat(" ", tokenizer->Decode({id}));
  std::printf("  tokenizer: supported: %s; special tokens per text: %s\n",
              tokenizer->description().c_str(), around.c_str());
  const absl::Status gguf = common::CheckGgufExport(dir);
  std::printf("  llama.cpp (export-gguf): %s\n",
              gguf.ok() ? "can be exported" : ("NO: " + std::string(gguf.message())).c_str());
  return weights;
}

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

// The adapters in `dirs`, and which methods can aggregate them together. Unreadable or non-finite
// adapters are printed as such and make the result an error.
absl::Status InspectAdapters(const std::vector<std::string>& dirs) {
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
    return absl::InvalidArgumentError(
        "some directories are not readable adapters or hold non-finite values (see above)");
  return absl::OkStatus();
}

}  // namespace

absl::Status Run(const InspectCommandOptions& o) {
  if (o.dirs.empty() && o.model.empty())
    return absl::InvalidArgumentError("inspect needs adapter directories or --model");
  if (!o.model.empty()) RETURN_IF_ERROR(InspectModel(o.model));
  if (!o.dirs.empty()) RETURN_IF_ERROR(InspectAdapters(o.dirs));
  return absl::OkStatus();
}

void AddInspectCommand(CLI::App& app) {
  auto o = std::make_shared<InspectCommandOptions>();
  CLI::App* cmd =
      app.add_subcommand("inspect",
                         "Show the modules, ranks, scalings and norms of PEFT adapters, and which "
                         "methods can aggregate them together; or, with --model, what a model is");
  cmd->add_option("dirs", o->dirs, "PEFT adapter directories");
  cmd->add_option("--model", o->model,
                  "a Hugging Face model directory: its family, sizes, LoRA targets, weights and "
                  "whether its tokenizer is supported");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
