// String building. Debian's Abseil is built with its own absl::string_view (not std::string_view),
// so absl::StrCat does not take std::string_view; this StrCat formats each piece with fmt instead.
#ifndef FEDLORA_COMMON_STRINGS_H_
#define FEDLORA_COMMON_STRINGS_H_

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cstdint>
#include <string>
#include <vector>

#include "absl/strings/string_view.h"

namespace fedlora::common {

namespace internal {
// absl::Status messages are absl::string_view, which fmt does not know.
template <typename T>
decltype(auto) Formattable(const T& x) {
  if constexpr (std::is_same_v<T, absl::string_view>) {
    return std::string_view(x.data(), x.size());
  } else {
    return (x);
  }
}
}  // namespace internal

template <typename... Args>
std::string StrCat(const Args&... args) {
  std::string out;
  (fmt::format_to(std::back_inserter(out), "{}", internal::Formattable(args)), ...);
  return out;
}

// "[r,n]": a tensor shape as error messages print it.
inline std::string ShapeString(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ","));
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_STRINGS_H_
