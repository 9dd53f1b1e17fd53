// String building. Debian's Abseil is built with its own absl::string_view (not std::string_view),
// so absl::StrCat does not take std::string_view; this StrCat formats each piece with fmt instead.
#ifndef FEDLORA_COMMON_BASE_STRINGS_H_
#define FEDLORA_COMMON_BASE_STRINGS_H_

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/strings/string_view.h"

// absl::Status messages are absl::string_view (Debian's Abseil does not alias std::string_view):
// let fmt, and so StrCat and spdlog, print them.
template <>
struct fmt::formatter<absl::string_view> : fmt::formatter<std::string_view> {
  template <typename FormatContext>
  auto format(absl::string_view s, FormatContext& ctx) const {
    return fmt::formatter<std::string_view>::format(std::string_view(s.data(), s.size()), ctx);
  }
};

namespace fedlora::common {

template <typename... Args>
std::string StrCat(const Args&... args) {
  std::string out;
  (fmt::format_to(std::back_inserter(out), "{}", args), ...);
  return out;
}

// The elements of `range` (anything fmt formats) with `separator` between them.
template <typename Range>
std::string StrJoin(const Range& range, std::string_view separator) {
  return fmt::format("{}", fmt::join(range, separator));
}

// "[r,n]": a tensor shape as error messages print it.
inline std::string ShapeString(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ","));
}

// 64-bit FNV-1a of `s`, continuing from `h`: a fast, stable, non-cryptographic hash for names and
// seeds (never for integrity: that is sha256's job).
inline uint64_t Fnv1a(std::string_view s, uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Whether `s` is well-formed UTF-8 (what JSON, protobuf strings and safetensors names must be).
bool IsUtf8(std::string_view s);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_STRINGS_H_
