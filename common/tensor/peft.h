// PEFT adapter directories, as Hugging Face PEFT saves and loads them:
// clang-format off
//   adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "target_modules", "use_rslora",
//                               "base_model_name_or_path", "rank_pattern", "alpha_pattern", ...}
//   adapter_model.safetensors  base_model.model.<module>.lora_A.weight [r, n]
//                              base_model.model.<module>.lora_B.weight [m, r]
//                              base_model.model.<module>.lora_R.weight [r, r]   (LoRA-SB / Fed-SB only)
//                              metadata {"format": "pt"}
// clang-format on
// A module's scaling is lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora, where r and
// lora_alpha may be overridden per module by rank_pattern / alpha_pattern (keys are regular
// expressions matched, as PEFT does, against the end of the module path).
#ifndef FEDLORA_COMMON_TENSOR_PEFT_H_
#define FEDLORA_COMMON_TENSOR_PEFT_H_

#include <filesystem>
#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/env.h"
#include "common/tensor/adapter.h"
#include "common/tensor/safetensors.h"

namespace fedlora::common {

inline constexpr char kAdapterConfigFile[] = "adapter_config.json";
inline constexpr char kAdapterWeightsFile[] = "adapter_model.safetensors";

double LoraScaling(double alpha, int rank, bool use_rslora);

// Reads a PEFT LoRA adapter directory. Every tensor must be a lora_A/lora_B/lora_R weight, every
// module must have both A and B with consistent shapes, and each module's rank must match the
// config. Values are converted to f32; non-finite values are read as they are (Adapter::CheckFinite
// tells).
absl::StatusOr<Adapter> ReadPeftAdapter(const std::filesystem::path& dir,
                                        Symlinks symlinks = Symlinks::kFollow);

// The adapter held by safetensors tensors named as PEFT names them; `scaling` gives each module's
// scaling (and may refuse the module). `origin` names the bytes in errors. Used for PEFT files and
// for fedlora's wire blobs. The result takes `reuse`'s memory (Adapter::Create).
absl::StatusOr<Adapter> AdapterFromSafetensors(
    const SafetensorsView& view, const std::string& origin,
    const std::function<absl::StatusOr<double>(const ModuleShape&)>& scaling, Adapter reuse = {});

enum class AdapterParts { kAll, kROnly };
// The adapter's tensors under their PEFT names (views into its buffer): A, B and R, or only R (a
// Fed-SB update).
std::vector<TensorToWrite> AdapterTensors(const Adapter& adapter, AdapterParts parts);

struct PeftWriteOptions {
  DType dtype = DType::kF32;  // Element type of the written tensors.
  bool overwrite = false;     // Replace an existing directory (atomically) instead of failing.
  Env* env = Env::Default();  // Where the files are written.
};

// Writes `adapter` as a PEFT directory, atomically (a failed write leaves no directory). The config
// is self-consistent: r is the most common module rank (others go to rank_pattern), use_rslora is
// false and lora_alpha = scaling·rank per module (others go to alpha_pattern), so every module's
// scaling is kept.
absl::Status WritePeftAdapter(const Adapter& adapter, const std::filesystem::path& dir,
                              const PeftWriteOptions& options = {});

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_PEFT_H_
