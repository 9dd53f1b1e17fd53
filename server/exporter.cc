#include "server/exporter.h"

#include <spdlog/spdlog.h>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/gguf_export.h"
#include "common/tensor/blob.h"
#include "common/tensor/low_rank.h"
#include "common/tensor/peft.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;
using common::StrCat;

absl::StatusOr<Adapter> ReadAdapterBlob(const StateStore& store, const BlobRef& b) {
  ASSIGN_OR_RETURN(std::string bytes, store.ReadWholeBlob(b.sha256));
  return common::DecodeAdapter(bytes, StrCat("blob ", b.sha256));
}

// What global/ holds: the latest adapter, or for flora every round's delta stacked (exact).
absl::StatusOr<Adapter> FinalAdapter(const Ledger& ledger, const StateStore& store,
                                     const Adapter& frozen) {
  if (ledger.method != Method::kFlora) return AdapterAt(ledger, store, ledger.latest(), frozen);
  std::vector<Adapter> deltas;
  for (int64_t v = 1; v <= ledger.latest(); ++v) {
    ASSIGN_OR_RETURN(Adapter d, ReadAdapterBlob(store, ledger.at(v).blobs.at(0)));
    deltas.push_back(std::move(d));
  }
  return common::StackAdapters(deltas, std::vector<double>(deltas.size(), 1.0));
}

// flora: the rank-r truncation of the summed deltas into dir/global-rank<r>, and its energy.
absl::Status ExportTruncated(const Adapter& global, int rank, const std::filesystem::path& dir,
                             const common::PeftWriteOptions& write) {
  std::vector<common::ModuleShape> shapes;
  std::vector<common::TruncatedProduct> cuts;
  nlohmann::json energy = nlohmann::json::object();
  double min_energy = 1;
  for (size_t i = 0; i < global.num_modules(); ++i) {
    cuts.push_back(
        common::TruncateProduct(global.B(i).cast<double>(), global.A(i).cast<double>(), rank));
    common::ModuleShape s = global.module(i);
    s.rank = static_cast<int>(cuts.back().a.rows());
    shapes.push_back(s);
    energy[s.name] = cuts.back().retained_energy;
    min_energy = std::min(min_energy, cuts.back().retained_energy);
  }
  ASSIGN_OR_RETURN(Adapter truncated, Adapter::Create(shapes));
  truncated.base_model = global.base_model;
  for (size_t i = 0; i < shapes.size(); ++i) {
    truncated.A(i) = cuts[i].a.cast<float>();
    truncated.B(i) = cuts[i].b.cast<float>();
  }
  const std::string name = StrCat("global-rank", rank);
  RETURN_IF_ERROR(common::WritePeftAdapter(truncated, dir / name, write));
  RETURN_IF_ERROR(common::WriteFileAtomically(
      dir / "retained_energy.json",
      nlohmann::json({{"rank", rank}, {"min", min_energy}, {"modules", energy}}).dump(2) + "\n",
      write.env));
  spdlog::info(
      "exported the rank-{} truncation of the summed deltas to {} (retained energy: min {:.6f} "
      "over modules)",
      rank, (dir / name).string(), min_energy);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Adapter> AdapterAt(const Ledger& ledger, const StateStore& store, int64_t version,
                                  const Adapter& frozen) {
  const BlobRef& latest = ledger.at(version).blobs.at(0);
  if (latest.kind == BlobKind::kFrozen) return frozen;  // R = 0
  if (latest.kind != BlobKind::kR) return ReadAdapterBlob(store, latest);
  ASSIGN_OR_RETURN(std::string bytes, store.ReadWholeBlob(latest.sha256));
  return common::DecodeROnto(bytes, StrCat("blob ", latest.sha256), frozen);
}

absl::Status Export(const Ledger& ledger, const StateStore& store, const ServerOptions& options,
                    const Adapter& frozen, Evaluator* evaluator) {
  const std::filesystem::path dir = store.dir() / "export";
  RETURN_IF_ERROR(common::RefuseLink(dir));
  ASSIGN_OR_RETURN(Adapter global, FinalAdapter(ledger, store, frozen));
  global.base_model = ledger.base_model_sha256;
  // Written into a fresh directory, which then replaces export/ in one step: a reader never sees
  // half an export, and nothing is written through a link someone put there.
  const auto fill = [&](const std::filesystem::path& out) -> absl::Status {
    const common::PeftWriteOptions write{common::DType::kF32, /*overwrite=*/false, store.env()};
    if (ledger.method == Method::kFedSb)
      RETURN_IF_ERROR(common::WritePeftAdapter(global.FoldR(), out / "global-lora", write));
    RETURN_IF_ERROR(common::WritePeftAdapter(global, out / "global", write));
    if (evaluator != nullptr) {
      ASSIGN_OR_RETURN(common::LlamaWeights merged,
                       evaluator->Merged(ledger, store, ledger.latest(), global));
      // In the base checkpoint's type, as the model it replaces.
      RETURN_IF_ERROR(merged.WriteModelDirectory(out / "merged", options.base_model_dir,
                                                 /*dtype=*/std::nullopt, /*overwrite=*/false,
                                                 store.env()));
      if (!options.export_gguf.empty()) {
        ASSIGN_OR_RETURN(const common::GgmlType type, common::ParseGgmlType(options.export_gguf));
        RETURN_IF_ERROR(store.env()->CreateDirectories(out / "gguf"));
        RETURN_IF_ERROR(common::ExportWeightsGguf(merged, options.base_model_dir, type,
                                                  out / "gguf" / "model.gguf", store.env())
                            .status());
        RETURN_IF_ERROR(common::ExportLoraGguf(options.base_model_dir, global,
                                               out / "gguf" / "adapter.gguf", store.env())
                            .status());
      }
    }
    if (ledger.method == Method::kFlora)
      RETURN_IF_ERROR(ExportTruncated(global, options.rank, out, write));
    return common::WriteFileSynced(out / "version.json",
                                   nlohmann::json({{"run_id", ledger.run_id},
                                                   {"method", common::MethodName(ledger.method)},
                                                   {"version", ledger.latest()},
                                                   {"rounds", options.rounds}})
                                           .dump(2) +
                                       "\n",
                                   store.env());
  };
  RETURN_IF_ERROR(common::BuildDirectoryAtomically(dir, /*overwrite=*/true, fill, store.env()));
  spdlog::info("exported version {} of {} rounds: the global adapter is in {}", ledger.latest(),
               options.rounds, (dir / "global").string());
  return absl::OkStatus();
}

}  // namespace fedlora::server
