// The PEFT adapter reader on hostile adapter_config.json files: the input, up to its first NUL, is
// the config; what follows names the one module of the weights file next to it (rank 4, 3 → 5), so
// rank_pattern / alpha_pattern keys meet module names of the fuzzer's choosing. Either the
// directory reads as an adapter whose every scaling is finite and within Adapter's bound, or it is
// refused with a status.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/tensor/peft.h"
#include "tests/fuzz/fuzz_util.h"

using namespace fedlora::common;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string input(reinterpret_cast<const char*>(data), size);
  const size_t nul = input.find('\0');
  const std::string config = input.substr(0, nul);
  std::string module =
      nul == std::string::npos ? "model.layers.0.self_attn.q_proj" : input.substr(nul + 1);
  const auto dir = fedlora::fuzz::ScratchDir() / "adapter";
  std::filesystem::create_directories(dir);
  fedlora::fuzz::WriteFile(dir / kAdapterConfigFile, config);
  const std::vector<float> a(4 * 3, 0.5f), b(5 * 4, 0.25f);
  const std::vector<TensorToWrite> tensors = {
      {"base_model.model." + module + ".lora_A.weight", {4, 3}, a},
      {"base_model.model." + module + ".lora_B.weight", {5, 4}, b}};
  if (!WriteSafetensors(dir / kAdapterWeightsFile, tensors, DType::kF32, {{"format", "pt"}}).ok())
    return 0;
  auto adapter = ReadPeftAdapter(dir);
  if (adapter.ok()) {
    FUZZ_CHECK(adapter->num_modules() == 1);
    const double s = adapter->module(0).scaling;
    FUZZ_CHECK(std::isfinite(s) && std::abs(s) <= kMaxScaling);
    FUZZ_CHECK(adapter->CheckFinite().ok());
  }
  return 0;
}
