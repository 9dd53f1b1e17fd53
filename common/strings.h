// String building. Debian's Abseil is built with its own absl::string_view (not std::string_view), so
// absl::StrCat does not take std::string_view; this StrCat formats each piece with fmt instead.
#ifndef FEDLORA_COMMON_STRINGS_H_
#define FEDLORA_COMMON_STRINGS_H_

#include <cstdint>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace fedlora::common {

template <typename... Args>
std::string StrCat(const Args&... args) {
  std::string out;
  (fmt::format_to(std::back_inserter(out), "{}", args), ...);
  return out;
}

// "[r,n]": a tensor shape as error messages print it.
inline std::string ShapeString(const std::vector<int64_t>& shape) { return fmt::format("[{}]", fmt::join(shape, ",")); }

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_STRINGS_H_
