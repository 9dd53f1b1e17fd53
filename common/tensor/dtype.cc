#include "common/tensor/dtype.h"

#include <Eigen/Core>
#include <bit>
#include <cassert>
#include <cstring>

#include "common/base/strings.h"

namespace fedlora::common {
namespace {

// One loop each, compiled three times; the loader picks the clone the CPU can run (GCC's
// target_clones). x86-64-v3 has F16C, so a half converts in one vcvtph2ps per 8 or 16 values.
// Elements are loaded with memcpy: the bytes may sit at any address (a safetensors header of
// any length, an upload); the compiler turns it into unaligned vector loads.
#define FEDLORA_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))

template <typename T>
T Load(const std::byte* in, size_t i) {
  T v;
  std::memcpy(&v, in + i * sizeof(T), sizeof(T));
  return v;
}

FEDLORA_CPU_CLONES void HalfToF32(const std::byte* in, size_t n, float* out) {
#ifdef __FLT16_MAX__  // the compiler has _Float16 (GCC 12; clang on x86 from 15)
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(Load<_Float16>(in, i));
#else
  for (size_t i = 0; i < n; ++i) out[i] = HalfBitsToFloat(Load<uint16_t>(in, i));
#endif
}

FEDLORA_CPU_CLONES void BFloat16ToF32(const std::byte* in, size_t n, float* out) {
  for (size_t i = 0; i < n; ++i)
    out[i] = std::bit_cast<float>(static_cast<uint32_t>(Load<uint16_t>(in, i)) << 16);
}

// A value is finite unless its exponent bits are all ones.
template <typename T>
bool Finite(const std::byte* in, size_t n, T exponent) {
  bool finite = true;
  for (size_t i = 0; i < n; ++i) finite &= (Load<T>(in, i) & exponent) != exponent;
  return finite;
}
FEDLORA_CPU_CLONES bool SixteenBitFinite(const std::byte* in, size_t n, uint16_t exponent) {
  return Finite<uint16_t>(in, n, exponent);
}
FEDLORA_CPU_CLONES bool F32Finite(const std::byte* in, size_t n) {
  return Finite<uint32_t>(in, n, 0x7f800000u);
}

}  // namespace

std::string_view DTypeName(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return "F32";
    case DType::kF16:
      return "F16";
    case DType::kBF16:
      return "BF16";
  }
  return "?";
}

size_t DTypeSize(DType dtype) { return dtype == DType::kF32 ? 4 : 2; }

absl::StatusOr<DType> ParseDType(std::string_view name) {
  if (name == "F32" || name == "f32") return DType::kF32;
  if (name == "F16" || name == "f16") return DType::kF16;
  if (name == "BF16" || name == "bf16") return DType::kBF16;
  return absl::InvalidArgumentError(
      StrCat("unknown dtype '", name, "' (expected f32, f16 or bf16)"));
}

float HalfBitsToFloat(uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::half>(bits));
}
float BFloat16BitsToFloat(uint16_t bits) {
  return static_cast<float>(Eigen::numext::bit_cast<Eigen::bfloat16>(bits));
}
uint16_t FloatToHalfBits(float value) {
  return Eigen::numext::bit_cast<uint16_t>(Eigen::half(value));
}
uint16_t FloatToBFloat16Bits(float value) {
  return Eigen::numext::bit_cast<uint16_t>(Eigen::bfloat16(value));
}

void ToF32(const void* src, DType dtype, size_t n, float* out) {
  switch (dtype) {
    case DType::kF32:
      std::memcpy(out, src, n * sizeof(float));
      break;
    case DType::kF16:
      HalfToF32(static_cast<const std::byte*>(src), n, out);
      break;
    case DType::kBF16:
      BFloat16ToF32(static_cast<const std::byte*>(src), n, out);
      break;
  }
}

void FromF32(std::span<const float> in, DType dtype, void* dst) {
  if (dtype == DType::kF32) {
    std::memcpy(dst, in.data(), in.size_bytes());
    return;
  }
  auto* out = static_cast<std::byte*>(dst);
  for (size_t i = 0; i < in.size(); ++i) {
    const uint16_t bits =
        dtype == DType::kF16 ? FloatToHalfBits(in[i]) : FloatToBFloat16Bits(in[i]);
    std::memcpy(out + 2 * i, &bits, 2);
  }
}

bool AllFinite(const void* src, DType dtype, size_t n) {
  const auto* in = static_cast<const std::byte*>(src);
  if (dtype == DType::kF32) return F32Finite(in, n);
  return SixteenBitFinite(in, n, dtype == DType::kF16 ? 0x7c00 : 0x7f80);
}

std::span<const float> StoredSpan::f32() const {
  assert(dtype_ == DType::kF32);
  return {static_cast<const float*>(data_), size_};
}

std::vector<float> StoredSpan::ToVector() const {
  std::vector<float> out(size_);
  ToF32(out);
  return out;
}

}  // namespace fedlora::common
