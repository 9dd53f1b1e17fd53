// fedlora export-gguf: a model (with an adapter merged) or an adapter alone as the GGUF files
// llama.cpp and Ollama load.
#include <cstdio>
#include <filesystem>
#include <optional>

#include "client/tool/commands.h"
#include "common/base/strings.h"
#include "common/llm/gguf_export.h"
#include "common/tensor/peft.h"

namespace fedlora::tool {
namespace {

struct ExportGgufArgs {
  std::string model, adapter, out, dtype = "f16";
  bool lora = false;
  bool overwrite = false;
};

void RunExportGguf(const ExportGgufArgs& a) {
  if (std::filesystem::exists(a.out) && !a.overwrite)
    ExitIfError(absl::AlreadyExistsError(a.out + " exists; give --overwrite to replace it"));
  std::optional<common::Adapter> adapter;
  if (!a.adapter.empty()) {
    auto read = common::ReadPeftAdapter(a.adapter);
    ExitIfError(read.status());
    ExitIfError(read->CheckFinite());
    adapter = std::move(*read);
  }
  absl::StatusOr<common::GgufExport> report;
  if (a.lora) {
    if (!adapter) ExitIfError(absl::InvalidArgumentError("--lora exports an --adapter; give one"));
    report = common::ExportLoraGguf(a.model, *adapter, a.out);
  } else {
    auto type = common::ParseGgmlType(a.dtype);
    ExitIfError(type.status());
    report = common::ExportModelGguf(a.model, adapter ? &*adapter : nullptr, *type, a.out);
  }
  ExitIfError(report.status());
  for (const std::string& note : report->notes) std::fprintf(stderr, "note: %s\n", note.c_str());
  std::printf(
      "wrote %s: %s %s, architecture %s, %zu tensors%s\n", a.out.c_str(),
      a.lora ? "LoRA adapter of" : "model", a.model.c_str(), report->architecture.c_str(),
      report->tensors,
      a.lora ? "" : common::StrCat(" (", a.dtype, "), tokenizer ", report->tokenizer).c_str());
}

}  // namespace

void AddExportGgufCommand(CLI::App& app) {
  auto a = std::make_shared<ExportGgufArgs>();
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
  cmd->callback([a] { RunExportGguf(*a); });
}

}  // namespace fedlora::tool
