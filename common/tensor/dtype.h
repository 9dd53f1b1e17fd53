// The element types of stored tensors (safetensors' F32, F16, BF16), their conversions to and from
// f32, and StoredSpan, a view of elements in any of them: what the frozen weights of a checkpoint
// are held as, so that a bf16 model takes the memory of its file, not twice it.
#ifndef FEDLORA_COMMON_TENSOR_DTYPE_H_
#define FEDLORA_COMMON_TENSOR_DTYPE_H_

#include <cassert>
#include <cstddef>
#include <cstdint>
#include <span>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

enum class DType { kF32, kF16, kBF16 };

std::string_view DTypeName(DType dtype);  // "F32", "F16", "BF16" as in the header.
size_t DTypeSize(DType dtype);
// Accepts the header spelling ("F32") or the lower-case CLI spelling ("f32").
absl::StatusOr<DType> ParseDType(std::string_view name);

// Element conversions (round to nearest even towards the 16-bit types).
float HalfBitsToFloat(uint16_t bits);
float BFloat16BitsToFloat(uint16_t bits);
uint16_t FloatToHalfBits(float value);
uint16_t FloatToBFloat16Bits(float value);

// n elements of `dtype` at `src` as f32, exactly (every f16 and bf16 value is an f32 value);
// vectorised for the CPU it runs on (AVX-512, AVX2 + F16C, or SSE2, chosen at load time).
void ToF32(const void* src, DType dtype, size_t n, float* out);
// `in` rounded to `dtype` at `dst` (DTypeSize(dtype)·in.size() bytes).
void FromF32(std::span<const float> in, DType dtype, void* dst);
// Whether none of the n elements is NaN or ±Inf.
bool AllFinite(const void* src, DType dtype, size_t n);

// Row-major elements of one DType, not owned: f32 values (from a span or vector, implicitly), or
// a tensor as a checkpoint stores it.
class StoredSpan {
 public:
  StoredSpan() = default;
  StoredSpan(std::span<const float> values)  // NOLINT: implicit, f32 values are stored as f32
      : data_(values.data()), dtype_(DType::kF32), size_(values.size()) {}
  StoredSpan(std::span<float> values)  // NOLINT: as above
      : StoredSpan(std::span<const float>(values)) {}
  StoredSpan(const std::vector<float>& values)  // NOLINT: as above
      : StoredSpan(std::span<const float>(values)) {}
  StoredSpan(std::vector<float>&&) = delete;  // would dangle
  StoredSpan(const void* data, DType dtype, size_t size)
      : data_(data), dtype_(dtype), size_(size) {}

  const void* data() const { return data_; }
  DType dtype() const { return dtype_; }
  size_t size() const { return size_; }
  size_t size_bytes() const { return size_ * DTypeSize(dtype_); }
  // Elements [offset, offset + count).
  StoredSpan subspan(size_t offset, size_t count) const {
    return {static_cast<const std::byte*>(data_) + offset * DTypeSize(dtype_), dtype_, count};
  }
  // The f32 values; the dtype must be kF32.
  std::span<const float> f32() const;
  // Every element as f32 into `out`, which holds size() values.
  void ToF32(std::span<float> out) const {
    assert(out.size() == size_);
    common::ToF32(data_, dtype_, size_, out.data());
  }
  std::vector<float> ToVector() const;

 private:
  const void* data_ = nullptr;
  DType dtype_ = DType::kF32;
  size_t size_ = 0;
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_DTYPE_H_
