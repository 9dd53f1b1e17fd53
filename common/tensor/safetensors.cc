#include "common/tensor/safetensors.h"

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>

#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

static_assert(
    std::endian::native == std::endian::little,
    "safetensors data is little-endian; fedlora reads it in place on little-endian hosts only");

using nlohmann::json;

// The safetensors reference implementation refuses headers above 100 MB.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// dtypes the format defines that fedlora does not compute with: recognised, so the error can say
// so.
constexpr std::string_view kOtherFormatDTypes[] = {
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F64", "F8_E4M3", "F8_E5M2"};

absl::Status HeaderError(std::string_view origin, std::string_view what) {
  return absl::InvalidArgumentError(StrCat(origin, ": invalid safetensors file: ", what));
}

// Parses one tensor entry of the header; checks field types and the dtype.
absl::StatusOr<TensorInfo> ParseEntry(std::string_view origin, const std::string& name,
                                      const json& entry) {
  auto bad = [&](std::string_view what) {
    return HeaderError(origin, StrCat("tensor '", name, "': ", what));
  };
  if (!entry.is_object()) return bad("expected an object with dtype, shape and data_offsets");
  for (const auto& [key, value] : entry.items()) {
    if (key != "dtype" && key != "shape" && key != "data_offsets")
      return bad(StrCat("unexpected field '", key, "'"));
  }
  if (!entry.contains("dtype") || !entry["dtype"].is_string())
    return bad("missing string field 'dtype'");
  if (!entry.contains("shape") || !entry["shape"].is_array())
    return bad("missing array field 'shape'");
  if (!entry.contains("data_offsets") || !entry["data_offsets"].is_array() ||
      entry["data_offsets"].size() != 2) {
    return bad("'data_offsets' must be an array [begin, end]");
  }
  TensorInfo info;
  info.name = name;
  const std::string dtype = entry["dtype"].get<std::string>();
  auto parsed = ParseDType(dtype);
  if (!parsed.ok()) {
    bool known = std::find(std::begin(kOtherFormatDTypes), std::end(kOtherFormatDTypes), dtype) !=
                 std::end(kOtherFormatDTypes);
    return bad(known ? StrCat("dtype ", dtype, " is not supported (expected F32, F16 or BF16)")
                     : StrCat("unknown dtype '", dtype, "' (expected F32, F16 or BF16)"));
  }
  info.dtype = *parsed;
  for (const json& dim : entry["shape"]) {
    if (!dim.is_number_unsigned()) return bad("shape entries must be non-negative integers");
    uint64_t d = dim.get<uint64_t>();
    if (d > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
      return bad("shape entry too large");
    info.shape.push_back(static_cast<int64_t>(d));
  }
  for (const json& off : entry["data_offsets"]) {
    if (!off.is_number_unsigned()) return bad("data_offsets must be non-negative integers");
  }
  info.begin = entry["data_offsets"][0].get<uint64_t>();
  info.end = entry["data_offsets"][1].get<uint64_t>();
  if (info.end < info.begin) {
    return bad(StrCat("data_offsets [", info.begin, ", ", info.end, "] end before they begin"));
  }
  // shape × dtype size must equal the byte range, without overflow.
  uint64_t bytes = DTypeSize(info.dtype);
  for (int64_t d : info.shape) {
    if (d != 0 && bytes > std::numeric_limits<uint64_t>::max() / static_cast<uint64_t>(d)) {
      return bad(StrCat("shape ", ShapeString(info.shape), " overflows"));
    }
    bytes *= static_cast<uint64_t>(d);
  }
  if (bytes != info.end - info.begin) {
    return bad(StrCat("shape ", ShapeString(info.shape), " of ", dtype, " needs ", bytes,
                      " bytes but data_offsets [", info.begin, ", ", info.end, "] hold ",
                      info.end - info.begin));
  }
  return info;
}

}  // namespace

int64_t TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<SafetensorsView> SafetensorsView::Parse(std::span<const uint8_t> bytes,
                                                       std::string_view origin) {
  if (bytes.size() < 8) {
    return HeaderError(origin, StrCat("the file is ", bytes.size(),
                                      " bytes; it must start with an 8-byte header length"));
  }
  uint64_t header_len;
  std::memcpy(&header_len, bytes.data(), 8);
  const uint64_t available = bytes.size() - 8;
  if (header_len > available) {  // said without the value: the bytes may be anything
    return HeaderError(origin, StrCat("the header length field exceeds the ", available,
                                      " bytes that follow it (not a safetensors file, or "
                                      "truncated)"));
  }
  if (header_len > kMaxHeaderBytes) {
    return HeaderError(origin, StrCat("header length ", header_len,
                                      " exceeds the format's limit of ", kMaxHeaderBytes));
  }
  if (header_len < 2 || bytes[8] != '{')
    return HeaderError(origin, "the header must be a JSON object");

  // Duplicate names would make the file ambiguous; nlohmann keeps the last silently, so catch them
  // here.
  std::set<std::string> seen;
  std::string duplicate;
  json::parser_callback_t on_event = [&](int depth, json::parse_event_t event, json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 &&
        !seen.insert(parsed.get<std::string>()).second) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json header;
  try {
    const char* begin = reinterpret_cast<const char*>(bytes.data() + 8);
    header = json::parse(begin, begin + header_len, on_event);
  } catch (const json::exception& e) {
    return HeaderError(origin, StrCat("the header is not valid JSON: ", e.what()));
  }
  if (!duplicate.empty())
    return HeaderError(origin, StrCat("tensor name '", duplicate, "' appears twice"));
  if (!header.is_object()) return HeaderError(origin, "the header must be a JSON object");

  SafetensorsView view;
  view.data_ = bytes.subspan(8 + header_len);
  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      if (!value.is_object())
        return HeaderError(origin, "__metadata__ must be an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        if (!mv.is_string())
          return HeaderError(origin, StrCat("__metadata__ value of '", mk, "' is not a string"));
        view.metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    ASSIGN_OR_RETURN(TensorInfo info, ParseEntry(origin, key, value));
    view.tensors_.push_back(std::move(info));
  }
  // The byte ranges must tile the data section: start at 0, no gap, no overlap, end at its end.
  std::stable_sort(view.tensors_.begin(), view.tensors_.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return a.begin < b.begin || (a.begin == b.begin && a.end < b.end);
                   });
  uint64_t expected = 0;
  for (const TensorInfo& t : view.tensors_) {
    if (t.begin < expected) {
      return HeaderError(origin,
                         StrCat("tensor '", t.name, "' data_offsets [", t.begin, ", ", t.end,
                                "] overlap the previous tensor, which ends at ", expected));
    }
    if (t.begin > expected) {
      return HeaderError(
          origin, StrCat("tensor '", t.name, "' starts at byte ", t.begin,
                         " but the previous tensor ends at ", expected, " (gap in the data)"));
    }
    expected = t.end;
  }
  if (expected != view.data_.size()) {
    return HeaderError(
        origin, StrCat("the tensors cover ", expected, " bytes of data but the file holds ",
                       view.data_.size(),
                       expected > view.data_.size() ? " (offsets out of range: truncated file?)"
                                                    : " (trailing bytes)"));
  }
  return view;
}

const TensorInfo* SafetensorsView::Find(std::string_view name) const {
  for (const TensorInfo& t : tensors_) {
    if (t.name == name) return &t;
  }
  return nullptr;
}

StoredSpan SafetensorsView::Elements(const TensorInfo& tensor) const {
  return {data_.data() + tensor.begin, tensor.dtype, static_cast<size_t>(tensor.num_elements())};
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::filesystem::path& path,
                                                      Symlinks symlinks) {
  ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path, symlinks));
  ASSIGN_OR_RETURN(SafetensorsView view, SafetensorsView::Parse(file.bytes(), path.string()));
  return SafetensorsFile(std::move(file), view);
}

absl::Status WriteSafetensors(std::FILE* out, std::span<const TensorToWrite> tensors, DType dtype,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const TensorToWrite& t : tensors) {
    int64_t numel = 1;
    for (int64_t d : t.shape) numel *= d;
    if (numel != static_cast<int64_t>(t.data.size())) {
      return absl::InvalidArgumentError(StrCat("tensor '", t.name, "': shape ",
                                               ShapeString(t.shape), " has ", numel,
                                               " elements but ", t.data.size(), " were given"));
    }
    if (header.contains(t.name))
      return absl::InvalidArgumentError(StrCat("tensor '", t.name, "' given twice"));
    const uint64_t bytes = static_cast<uint64_t>(numel) * DTypeSize(dtype);
    header[t.name] = {{"dtype", DTypeName(dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception&) {  // a name or metadata value that is not UTF-8
    return absl::InvalidArgumentError("a tensor name or metadata value is not UTF-8");
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');
  const uint64_t header_len = header_text.size();

  auto put = [&](const void* p, size_t n) { return std::fwrite(p, 1, n, out) == n; };
  bool ok = put(&header_len, 8) && put(header_text.data(), header_text.size());
  // Other types convert through f32 in chunks, so a tensor costs no copy of its size.
  constexpr size_t kChunk = 1 << 16;
  std::vector<float> values(kChunk);
  std::vector<uint8_t> converted(kChunk * DTypeSize(dtype));
  for (const TensorToWrite& t : tensors) {
    if (!ok) break;
    if (t.data.dtype() == dtype) {
      ok = put(t.data.data(), t.data.size_bytes());
      continue;
    }
    for (size_t i = 0; ok && i < t.data.size(); i += kChunk) {
      const size_t n = std::min(kChunk, t.data.size() - i);
      t.data.subspan(i, n).ToF32(std::span(values).first(n));
      FromF32(std::span(values).first(n), dtype, converted.data());
      ok = put(converted.data(), n * DTypeSize(dtype));
    }
  }
  if (!ok)
    return absl::InternalError(StrCat("cannot write safetensors data: ", std::strerror(errno)));
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::filesystem::path& path,
                              std::span<const TensorToWrite> tensors, DType dtype,
                              const std::map<std::string, std::string>& metadata) {
  return WriteFileAtomically(
      path, [&](std::FILE* out) { return WriteSafetensors(out, tensors, dtype, metadata); });
}

}  // namespace fedlora::common
