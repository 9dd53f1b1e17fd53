#include "common/llm/gguf.h"

#include <cerrno>
#include <cmath>
#include <cstring>

#include "common/base/strings.h"
#include "common/tensor/safetensors.h"

namespace fedlora::common {
namespace {

// gguf.h's enum gguf_type.
enum GgufType : uint32_t {
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
};
constexpr uint32_t kVersion = 3;
constexpr uint64_t kAlignment = 32;   // general.alignment's default
constexpr size_t kMaxNameBytes = 63;  // GGML_MAX_NAME - 1

uint64_t Align(uint64_t n) { return (n + kAlignment - 1) / kAlignment * kAlignment; }

// Little-endian serialisation (the machines fedlora runs on are little-endian, as GGUF's default).
class Out {
 public:
  template <typename T>
  void Pod(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    bytes_.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void String(const std::string& s) {
    Pod<uint64_t>(s.size());
    bytes_ += s;
  }
  void Value(const GgufValue& value) {
    std::visit(
        [this](const auto& v) {
          using T = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<T, uint32_t>) Typed(kU32, v);
          if constexpr (std::is_same_v<T, int32_t>) Typed(kI32, v);
          if constexpr (std::is_same_v<T, float>) Typed(kF32, v);
          if constexpr (std::is_same_v<T, bool>) Typed(kBool, static_cast<uint8_t>(v));
          if constexpr (std::is_same_v<T, std::string>) {
            Pod(kString);
            String(v);
          }
          if constexpr (std::is_same_v<T, std::vector<std::string>>) {
            Array(kString, v.size());
            for (const std::string& s : v) String(s);
          }
          if constexpr (std::is_same_v<T, std::vector<int32_t>>) Numbers(kI32, v);
          if constexpr (std::is_same_v<T, std::vector<float>>) Numbers(kF32, v);
        },
        value);
  }
  void Pad() { bytes_.append(Align(bytes_.size()) - bytes_.size(), '\0'); }
  std::string& bytes() { return bytes_; }

 private:
  template <typename T>
  void Typed(GgufType type, T v) {
    Pod(type);
    Pod(v);
  }
  void Array(GgufType element, size_t n) {
    Pod(kArray);
    Pod(element);
    Pod<uint64_t>(n);
  }
  template <typename T>
  void Numbers(GgufType element, const std::vector<T>& v) {
    Array(element, v.size());
    bytes_.append(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(T));
  }
  std::string bytes_;
};

}  // namespace

absl::StatusOr<GgmlType> ParseGgmlType(const std::string& name) {
  for (GgmlType t : {GgmlType::kF32, GgmlType::kF16, GgmlType::kBF16, GgmlType::kQ8_0})
    if (name == GgmlTypeName(t)) return t;
  return absl::InvalidArgumentError(
      StrCat("unknown GGUF tensor type '", name, "'; expected f32, f16, bf16 or q8_0"));
}

const char* GgmlTypeName(GgmlType type) {
  switch (type) {
    case GgmlType::kF32:
      return "f32";
    case GgmlType::kF16:
      return "f16";
    case GgmlType::kBF16:
      return "bf16";
    case GgmlType::kQ8_0:
      return "q8_0";
  }
  return "?";
}

int64_t GgmlRowBytes(GgmlType type, int64_t n) {
  switch (type) {
    case GgmlType::kF32:
      return 4 * n;
    case GgmlType::kF16:
    case GgmlType::kBF16:
      return 2 * n;
    case GgmlType::kQ8_0:
      return n / kQ8_0Block * (2 + kQ8_0Block);
  }
  return 0;
}

void EncodeGgmlRow(GgmlType type, std::span<const float> row, std::string& out) {
  auto put16 = [&out](uint16_t v) { out.append(reinterpret_cast<const char*>(&v), 2); };
  switch (type) {
    case GgmlType::kF32:
      out.append(reinterpret_cast<const char*>(row.data()), row.size_bytes());
      return;
    case GgmlType::kF16:
      for (float x : row) put16(FloatToHalfBits(x));
      return;
    case GgmlType::kBF16:
      for (float x : row) put16(FloatToBFloat16Bits(x));
      return;
    case GgmlType::kQ8_0:
      for (size_t b = 0; b + kQ8_0Block <= row.size(); b += kQ8_0Block) {
        float amax = 0;
        for (int j = 0; j < kQ8_0Block; ++j) amax = std::max(amax, std::fabs(row[b + j]));
        const float d = amax / 127.0f;
        const float id = d != 0 ? 1.0f / d : 0.0f;
        put16(FloatToHalfBits(d));
        for (int j = 0; j < kQ8_0Block; ++j)
          out.push_back(static_cast<char>(static_cast<int8_t>(std::round(row[b + j] * id))));
      }
      return;
  }
}

void GgufWriter::Set(const std::string& key, GgufValue value) {
  for (auto& [k, v] : metadata_) {
    if (k == key) {
      v = std::move(value);
      return;
    }
  }
  metadata_.emplace_back(key, std::move(value));
}

absl::Status GgufWriter::AddTensor(const std::string& name, std::vector<int64_t> shape,
                                   StoredSpan values, GgmlType type) {
  if (name.empty() || name.size() > kMaxNameBytes)
    return absl::InvalidArgumentError(StrCat("GGUF tensor name '", name, "' has ", name.size(),
                                             " bytes; llama.cpp takes 1 to ", kMaxNameBytes));
  for (const Tensor& t : tensors_)
    if (t.name == name)
      return absl::InvalidArgumentError(StrCat("tensor '", name, "' given twice"));
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  if (shape.empty() || numel != static_cast<int64_t>(values.size()))
    return absl::InvalidArgumentError(StrCat("tensor '", name, "': shape ", ShapeString(shape),
                                             " holds ", numel, " values, ", values.size(),
                                             " were given"));
  if (type == GgmlType::kQ8_0 && shape.back() % kQ8_0Block != 0)
    return absl::InvalidArgumentError(StrCat("tensor '", name, "': rows of ", shape.back(),
                                             " values cannot be Q8_0 (blocks of ", kQ8_0Block,
                                             ")"));
  const uint64_t bytes =
      static_cast<uint64_t>(numel / shape.back() * GgmlRowBytes(type, shape.back()));
  tensors_.push_back({name, std::move(shape), values, type, data_bytes_, bytes});
  data_bytes_ = Align(data_bytes_ + bytes);
  return absl::OkStatus();
}

absl::Status GgufWriter::Write(std::FILE* file) const {
  Out out;
  out.Pod<uint32_t>(0x46554747);  // "GGUF"
  out.Pod(kVersion);
  out.Pod<uint64_t>(tensors_.size());
  out.Pod<uint64_t>(metadata_.size());
  for (const auto& [key, value] : metadata_) {
    out.String(key);
    out.Value(value);
  }
  for (const Tensor& t : tensors_) {
    out.String(t.name);
    out.Pod<uint32_t>(static_cast<uint32_t>(t.shape.size()));
    for (auto d = t.shape.rbegin(); d != t.shape.rend(); ++d) out.Pod<uint64_t>(*d);
    out.Pod(static_cast<uint32_t>(t.type));
    out.Pod(t.offset);
  }
  out.Pad();  // the data section starts aligned
  std::string& bytes = out.bytes();
  auto flush = [&] {
    const bool ok = std::fwrite(bytes.data(), 1, bytes.size(), file) == bytes.size();
    bytes.clear();
    return ok;
  };
  bool ok = flush();
  std::vector<float> row;
  for (const Tensor& t : tensors_) {
    row.resize(static_cast<size_t>(t.shape.back()));
    for (size_t r = 0; ok && r < t.values.size(); r += row.size()) {
      t.values.subspan(r, row.size()).ToF32(row);
      EncodeGgmlRow(t.type, row, bytes);
      if (bytes.size() >= (1 << 22)) ok = flush();
    }
    bytes.append(Align(t.bytes) - t.bytes, '\0');  // the next tensor starts aligned
  }
  if (!(ok && flush()))
    return absl::InternalError(StrCat("cannot write the GGUF file: ", std::strerror(errno)));
  return absl::OkStatus();
}

}  // namespace fedlora::common
