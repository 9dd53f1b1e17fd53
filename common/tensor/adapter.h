// A LoRA adapter: a table of modules over one contiguous f32 buffer.
//
// For one adapted linear layer W (m×n, PyTorch layout) a module holds A (r×n) and B (m×r), and for
// LoRA-SB / Fed-SB also R (r×r); the layer computes y = W0·x + s·B·A·x (or s·B·R·A·x) with scaling
// s. Each module's matrices are stored row-major, back to back in the order A, B, R, so a module
// maps one-to-one onto the tensors of a PEFT file ([r, n], [m, r], [r, r]).
#ifndef FEDLORA_COMMON_TENSOR_ADAPTER_H_
#define FEDLORA_COMMON_TENSOR_ADAPTER_H_

#include <cstddef>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor/eigen_types.h"

namespace fedlora::common {

// The largest |scaling| an adapter may carry. PEFT's lora_alpha / r is about 0.5–4 in practice
// (rsLoRA's lora_alpha / √r a little more); a value far beyond is a mistake or an attack — 1e300
// folded into B makes an aggregate infinite — and is refused wherever an adapter is made.
inline constexpr double kMaxScaling = 1e4;

// The longest module name accepted (a real model's module paths are under 100 characters), and
// the largest dimension of a module (vocabularies reach 262,144; hidden sizes 30,000).
inline constexpr size_t kMaxModuleName = 4096;
inline constexpr int kMaxFeatures = 1 << 22;
inline bool InFeatureRange(int64_t d) { return d >= 1 && d <= kMaxFeatures; }
// OK when `name` can name a module: 1 to kMaxModuleName bytes of UTF-8 (what safetensors headers,
// JSON state files and protobuf strings can carry).
absl::Status CheckModuleName(std::string_view name);

struct ModuleShape {
  std::string name;      // Module path in the base model, e.g. "model.layers.0.self_attn.q_proj".
  int rank = 0;          // r
  int in_features = 0;   // n: columns of W and of A.
  int out_features = 0;  // m: rows of W and of B.
  double scaling = 1.0;  // s: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA.
  bool has_r = false;    // LoRA-SB / Fed-SB module (B·R·A) when set.
};

struct LoraModule : ModuleShape {
  size_t a_offset = 0;  // Offsets into the adapter's buffer, in floats.
  size_t b_offset = 0;
  size_t r_offset = 0;  // Meaningful only when has_r.
  size_t size() const;  // Floats used by this module.
};

class Adapter {
 public:
  Adapter() = default;

  // Lays the modules out in one zero-filled buffer. Names must be valid (CheckModuleName) and
  // unique, every dimension in [1, kMaxFeatures]. The buffer is `reuse`'s where it is large enough:
  // a loop that decodes many adapters of one shape in turn then allocates (and the kernel zeroes
  // fresh pages) once, not once per adapter.
  static absl::StatusOr<Adapter> Create(const std::vector<ModuleShape>& modules,
                                        Adapter reuse = {});

  size_t num_modules() const { return modules_.size(); }
  const std::vector<LoraModule>& modules() const { return modules_; }
  const LoraModule& module(size_t i) const { return modules_[i]; }
  std::optional<size_t> FindModule(std::string_view name) const;
  void set_scaling(size_t i, double scaling) { modules_[i].scaling = scaling; }

  MapF A(size_t i);  // r×n
  MapF B(size_t i);  // m×r
  MapF R(size_t i);  // r×r; only for has_r modules.
  ConstMapF A(size_t i) const;
  ConstMapF B(size_t i) const;
  ConstMapF R(size_t i) const;

  std::span<float> values() { return buffer_; }
  std::span<const float> values() const { return buffer_; }

  // ‖s·B·A‖_F (or ‖s·B·R·A‖_F), computed from r×r Gram matrices: never forms the m×n delta.
  double DeltaNorm(size_t i) const;

  // OK when every value is finite; otherwise names the first module and tensor that is not.
  absl::Status CheckFinite() const;

  // The plain-LoRA form of a LoRA-SB adapter: B·R folded into B, R dropped. Modules without R are
  // copied.
  Adapter FoldR() const;

  // Where this adapter came from (a directory, a client id), for error messages.
  std::string source;
  // base_model_name_or_path of the PEFT config; empty when unknown.
  std::string base_model;

 private:
  std::vector<LoraModule> modules_;
  std::vector<float> buffer_;
};

// PEFT's initialisation of a LoRA factor A (r×n): U(−1/√n, 1/√n) element by element, i.e.
// kaiming_uniform(a=√5); B starts at 0, so the adapted model starts unchanged.
void InitLoraA(MapF a, std::mt19937_64& rng);

// An m×k matrix (k ≤ m) with orthonormal columns: the Q of the QR decomposition of an m×k matrix
// of N(0, 1) draws from `rng` (taken in storage order). LoRA-SB's frozen B is one, and its A the
// transpose of another.
MatrixD RandomOrthonormal(int m, int k, std::mt19937_64& rng);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_ADAPTER_H_
