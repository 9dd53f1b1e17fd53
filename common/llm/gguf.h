// GGUF, llama.cpp's model file (version 3): a little-endian header — magic "GGUF", version,
// tensor count, metadata count —, the metadata as typed key/value pairs, the tensor table (name,
// dimensions innermost first, ggml type, offset into the data section), then the tensor data, each
// tensor at a multiple of general.alignment (32). The writer here holds the metadata and a table of
// tensors that point into memory the caller keeps, and streams the file in one pass.
#ifndef FEDLORA_COMMON_LLM_GGUF_H_
#define FEDLORA_COMMON_LLM_GGUF_H_

#include <cstdint>
#include <cstdio>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor/dtype.h"

namespace fedlora::common {

// The ggml tensor types fedlora writes (ggml.h's enum ggml_type).
enum class GgmlType : uint32_t { kF32 = 0, kF16 = 1, kQ8_0 = 8, kBF16 = 30 };

// "f32", "f16", "bf16", "q8_0".
absl::StatusOr<GgmlType> ParseGgmlType(const std::string& name);
const char* GgmlTypeName(GgmlType type);
// Q8_0: blocks of 32 values along a row, each an f16 scale d = max|x| / 127 and 32 int8 round(x/d).
inline constexpr int kQ8_0Block = 32;
// Bytes of `n` values of `type` in a row (n a multiple of kQ8_0Block for Q8_0).
int64_t GgmlRowBytes(GgmlType type, int64_t n);
// One row of values in `type`'s encoding, appended to `out` (ggml's reference quantisation for
// Q8_0; round to nearest even for f16 and bf16).
void EncodeGgmlRow(GgmlType type, std::span<const float> row, std::string& out);

using GgufValue = std::variant<uint32_t, int32_t, float, bool, std::string,
                               std::vector<std::string>, std::vector<int32_t>, std::vector<float>>;

class GgufWriter {
 public:
  // Metadata, written in the order set; a key set twice keeps its last value.
  void Set(const std::string& key, GgufValue value);
  // A tensor of `shape` in PyTorch's order (row-major, the last dimension contiguous), which
  // `values` (kept alive by the caller until Write; any DType) holds, stored as `type`. Refused: a
  // name given twice or longer than llama.cpp's 63 bytes, a size that does not match, and Q8_0 for
  // rows that are not a multiple of 32 values.
  absl::Status AddTensor(const std::string& name, std::vector<int64_t> shape, StoredSpan values,
                         GgmlType type);
  // The whole file into `out`.
  absl::Status Write(std::FILE* out) const;
  size_t num_tensors() const { return tensors_.size(); }

 private:
  struct Tensor {
    std::string name;
    std::vector<int64_t> shape;
    StoredSpan values;
    GgmlType type;
    uint64_t offset;  // in the data section
    uint64_t bytes;
  };
  std::vector<std::pair<std::string, GgufValue>> metadata_;
  std::vector<Tensor> tensors_;
  uint64_t data_bytes_ = 0;
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_GGUF_H_
