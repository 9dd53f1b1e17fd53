// Typed reads of the JSON a run writes (common/run/records.h, ledger.h), without exceptions: every
// field is checked for its type before it is taken, and the first error names where the object
// came from (a file and line), the field's path and what was expected and found:
//   state/metrics.jsonl line 3: /client_dp/epsilon: expected a number, found "abc"
#ifndef FEDLORA_COMMON_RUN_JSON_READER_H_
#define FEDLORA_COMMON_RUN_JSON_READER_H_

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

class JsonReader {
 public:
  // `where` names the document ("state/ledger.json", "metrics.jsonl line 3"); `path` the object's
  // place in it ("" for the top, "/versions/2").
  JsonReader(const nlohmann::json& json, std::string where, std::string path = "");

  // A required field. A type can be read when it is a number, string, bool, a vector or
  // string-keyed map of readable types, or a struct with `static absl::StatusOr<T>
  // FromJson(JsonReader&)`.
  template <typename T>
  JsonReader& Get(std::string_view key, T* out) {
    if (const nlohmann::json* v = Field(key, /*required=*/true)) Read(*v, Path(key), out);
    return *this;
  }
  template <typename T>
  JsonReader& Get(std::string_view key, std::optional<T>* out) {
    if (const nlohmann::json* v = Field(key, /*required=*/true))
      Read(*v, Path(key), &out->emplace());
    return *this;
  }
  // An optional field: left as it is when absent (or null, for a std::optional).
  template <typename T>
  JsonReader& Maybe(std::string_view key, T* out) {
    const nlohmann::json* v = Field(key, /*required=*/false);
    if (v != nullptr) Read(*v, Path(key), out);
    return *this;
  }
  template <typename T>
  JsonReader& Maybe(std::string_view key, std::optional<T>* out) {
    const nlohmann::json* v = Field(key, /*required=*/false);
    if (v != nullptr && !v->is_null()) Read(*v, Path(key), &out->emplace());
    return *this;
  }

  bool ok() const { return status_.ok(); }
  const absl::Status& status() const { return status_; }
  // Records an error of the object's own (a value out of range, an unknown name) at `key`.
  void Fail(std::string_view key, std::string_view what);

  // Reads a whole document as T.
  template <typename T>
  static absl::StatusOr<T> Parse(const nlohmann::json& json, std::string where) {
    JsonReader in(json, std::move(where));
    T out;
    in.Read(json, "", &out);
    if (!in.ok()) return in.status();
    return out;
  }

 private:
  const nlohmann::json* Field(std::string_view key, bool required);
  std::string Path(std::string_view key) const;
  void Expected(const std::string& path, std::string_view expected, const nlohmann::json& found);

  void Read(const nlohmann::json& v, const std::string& path, int64_t* out);
  void Read(const nlohmann::json& v, const std::string& path, int* out);
  void Read(const nlohmann::json& v, const std::string& path, uint64_t* out);
  // A number, or null (NaN: nlohmann::json writes a NaN or an infinity as null).
  void Read(const nlohmann::json& v, const std::string& path, double* out);
  void Read(const nlohmann::json& v, const std::string& path, bool* out);
  void Read(const nlohmann::json& v, const std::string& path, std::string* out);
  // Any value, as it is (for a part another reader checks).
  void Read(const nlohmann::json& v, const std::string&, nlohmann::json* out) { *out = v; }
  template <typename T>
  void Read(const nlohmann::json& v, const std::string& path, std::vector<T>* out) {
    if (!v.is_array()) return Expected(path, "an array", v);
    out->clear();
    for (size_t i = 0; i < v.size() && ok(); ++i)
      Read(v[i], path + "/" + std::to_string(i), &out->emplace_back());
  }
  template <typename T>
  void Read(const nlohmann::json& v, const std::string& path, std::map<std::string, T>* out) {
    if (!v.is_object()) return Expected(path, "an object", v);
    out->clear();
    for (auto it = v.begin(); it != v.end() && ok(); ++it)
      Read(it.value(), path + "/" + it.key(), &(*out)[it.key()]);
  }
  template <typename T>
  requires std::is_class_v<T> && requires(JsonReader& r) { T::FromJson(r); }
  void Read(const nlohmann::json& v, const std::string& path, T* out) {
    if (!v.is_object()) return Expected(path, "an object", v);
    JsonReader nested(v, where_, path);
    absl::StatusOr<T> value = T::FromJson(nested);
    if (!nested.ok()) {
      status_ = nested.status();
    } else if (!value.ok()) {
      status_ = value.status();
    } else {
      *out = *std::move(value);
    }
  }

  const nlohmann::json& json_;
  std::string where_;
  std::string path_;
  absl::Status status_;
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_RUN_JSON_READER_H_
