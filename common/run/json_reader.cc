#include "common/run/json_reader.h"

#include "common/base/strings.h"

namespace fedlora::common {

JsonReader::JsonReader(const nlohmann::json& json, std::string where, std::string path)
    : json_(json), where_(std::move(where)), path_(std::move(path)) {}

std::string JsonReader::Path(std::string_view key) const { return StrCat(path_, "/", key); }

const nlohmann::json* JsonReader::Field(std::string_view key, bool required) {
  if (!ok()) return nullptr;
  if (!json_.is_object()) {
    Expected(path_.empty() ? "/" : path_, "an object", json_);
    return nullptr;
  }
  const auto it = json_.find(key);
  if (it == json_.end()) {
    if (required) status_ = absl::DataLossError(StrCat(where_, ": ", Path(key), ": missing"));
    return nullptr;
  }
  return &*it;
}

void JsonReader::Fail(std::string_view key, std::string_view what) {
  if (ok()) status_ = absl::DataLossError(StrCat(where_, ": ", Path(key), ": ", what));
}

void JsonReader::Expected(const std::string& path, std::string_view expected,
                          const nlohmann::json& found) {
  if (!ok()) return;
  std::string shown = found.dump();
  if (shown.size() > 40) shown = shown.substr(0, 37) + "...";
  status_ = absl::DataLossError(
      StrCat(where_, ": ", path.empty() ? "/" : path, ": expected ", expected, ", found ", shown));
}

void JsonReader::Read(const nlohmann::json& v, const std::string& path, int64_t* out) {
  if (v.is_number_unsigned() && v.get<uint64_t>() > uint64_t{INT64_MAX})
    return Expected(path, "an integer of at most 2^63 - 1", v);
  if (!v.is_number_integer()) return Expected(path, "an integer", v);
  *out = v.get<int64_t>();
}

void JsonReader::Read(const nlohmann::json& v, const std::string& path, int* out) {
  int64_t wide = 0;
  if (v.is_number_integer() && (v.get<int64_t>() < std::numeric_limits<int>::min() ||
                                v.get<int64_t>() > std::numeric_limits<int>::max()))
    return Expected(path, "a 32-bit integer", v);
  Read(v, path, &wide);
  if (ok()) *out = static_cast<int>(wide);
}

void JsonReader::Read(const nlohmann::json& v, const std::string& path, uint64_t* out) {
  if (!v.is_number_unsigned()) return Expected(path, "an integer of at least 0", v);
  *out = v.get<uint64_t>();
}

void JsonReader::Read(const nlohmann::json& v, const std::string& path, double* out) {
  if (v.is_null()) {
    *out = std::numeric_limits<double>::quiet_NaN();
  } else if (v.is_number()) {
    *out = v.get<double>();
  } else {
    Expected(path, "a number", v);
  }
}

void JsonReader::Read(const nlohmann::json& v, const std::string& path, bool* out) {
  if (!v.is_boolean()) return Expected(path, "true or false", v);
  *out = v.get<bool>();
}

void JsonReader::Read(const nlohmann::json& v, const std::string& path, std::string* out) {
  if (!v.is_string()) return Expected(path, "a string", v);
  *out = v.get<std::string>();
}

}  // namespace fedlora::common
