// Reading and writing the safetensors format (https://github.com/huggingface/safetensors):
//   [8 bytes: little-endian u64 N][N bytes: JSON header][data section]
// The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (byte
// offsets into the data section) and may hold "__metadata__", a map of strings. Every rule of the
// format is checked on read: header length within the file, valid JSON without duplicate names,
// known dtype, shape × dtype size equal to the byte range, offsets contiguous from 0 and covering
// the data section exactly (no gap, no overlap).
#ifndef FEDLORA_COMMON_TENSOR_SAFETENSORS_H_
#define FEDLORA_COMMON_TENSOR_SAFETENSORS_H_

#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/file_util.h"
#include "common/tensor/dtype.h"

namespace fedlora::common {

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // Byte offsets into the data section, [begin, end).
  uint64_t end = 0;

  int64_t num_elements() const;
};

// A validated view of safetensors bytes; it does not own them, so they must outlive the view.
class SafetensorsView {
 public:
  // `origin` names the bytes (a path) in error messages.
  static absl::StatusOr<SafetensorsView> Parse(std::span<const uint8_t> bytes,
                                               std::string_view origin);

  // Tensors in data-section order (the order the writer stored them in).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorInfo* Find(std::string_view name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The tensor's elements in place, in its dtype.
  StoredSpan Elements(const TensorInfo& tensor) const;
  // Converts the tensor's elements to f32; `out` must hold exactly num_elements() values.
  void ReadF32(const TensorInfo& tensor, std::span<float> out) const {
    Elements(tensor).ToF32(out);
  }

 private:
  std::span<const uint8_t> data_;  // The data section.
  std::vector<TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A memory-mapped, validated safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<SafetensorsFile> Open(const std::filesystem::path& path,
                                              Symlinks symlinks = Symlinks::kFollow);
  const SafetensorsView& view() const { return view_; }

 private:
  SafetensorsFile(MappedFile file, SafetensorsView view) : file_(std::move(file)), view_(view) {}
  MappedFile file_;
  SafetensorsView view_;
};

struct TensorToWrite {
  std::string name;
  std::vector<int64_t> shape;
  StoredSpan
      data;  // Row-major, product(shape) elements (f32 values, or as a checkpoint stores them).
};

// Writes the tensors, in the given order, converted to `dtype` (round to nearest even for
// F16/BF16; a tensor already in `dtype` is copied as it is). The header is padded with spaces so
// the data section starts 8-byte aligned. Written atomically.
absl::Status WriteSafetensors(const std::filesystem::path& path,
                              std::span<const TensorToWrite> tensors, DType dtype,
                              const std::map<std::string, std::string>& metadata);
// The same, into an open stream (the caller makes it durable).
absl::Status WriteSafetensors(std::FILE* out, std::span<const TensorToWrite> tensors, DType dtype,
                              const std::map<std::string, std::string>& metadata);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_SAFETENSORS_H_
