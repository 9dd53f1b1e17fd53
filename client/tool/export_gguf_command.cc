#include "client/tool/export_gguf_command.h"

#include <cstdio>
#include <filesystem>
#include <optional>

#include "client/tool/commands.h"
#include "client/tool/llm_inputs.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/gguf_export.h"

namespace fedlora::tool {

absl::Status Run(const ExportGgufCommandOptions& a) {
  if (std::filesystem::exists(a.out) && !a.overwrite)
    return absl::AlreadyExistsError(a.out + " exists; give --overwrite to replace it");
  ASSIGN_OR_RETURN(const std::optional<common::Adapter> adapter, ReadAdapterIfNamed(a.adapter));
  if (adapter) RETURN_IF_ERROR(adapter->CheckFinite());
  absl::StatusOr<common::GgufExport> report;
  if (a.lora) {
    if (!adapter) return absl::InvalidArgumentError("--lora exports an --adapter; give one");
    report = common::ExportLoraGguf(a.model, *adapter, a.out);
  } else {
    ASSIGN_OR_RETURN(const auto type, common::ParseGgmlType(a.dtype));
    report = common::ExportModelGguf(a.model, adapter ? &*adapter : nullptr, type, a.out);
  }
  if (!report.ok()) return report.status();
  for (const std::string& note : report->notes) std::fprintf(stderr, "note: %s\n", note.c_str());
  std::printf(
      "wrote %s: %s %s, architecture %s, %zu tensors%s\n", a.out.c_str(),
      a.lora ? "LoRA adapter of" : "model", a.model.c_str(), report->architecture.c_str(),
      report->tensors,
      a.lora ? "" : common::StrCat(" (", a.dtype, "), tokenizer ", report->tokenizer).c_str());
  return absl::OkStatus();
}

void AddExportGgufCommand(CLI::App& app) {
  auto a = std::make_shared<ExportGgufCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "export-gguf",
      "Write a model (with an adapter merged) or, with --lora, an adapter alone as GGUF for "
      "llama.cpp and Ollama");
  cmd->add_option("--model", a->model, "Hugging Face model directory (the base model)")->required();
  cmd->add_option("--adapter", a->adapter, "PEFT adapter directory");
  cmd->add_option("--out", a->out, "GGUF file to write")->required();
  cmd->add_option("--dtype", a->dtype, "type of the 2-D weights: f32, f16, bf16 or q8_0")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "f16", "bf16", "q8_0"}));
  cmd->add_flag("--lora", a->lora,
                "write the adapter alone as a llama.cpp LoRA adapter (llama-cli --lora, Ollama's "
                "ADAPTER) instead of a merged model");
  cmd->add_flag("--overwrite", a->overwrite, "replace --out if it exists");
  cmd->callback([a] { ExitIfError(Run(*a)); });
}

}  // namespace fedlora::tool
