#include "common/base/strings.h"

#include <utf8proc.h>

namespace fedlora::common {

bool IsUtf8(std::string_view s) {
  for (size_t at = 0; at < s.size();) {
    utf8proc_int32_t cp;
    const auto n = utf8proc_iterate(reinterpret_cast<const utf8proc_uint8_t*>(s.data() + at),
                                    static_cast<utf8proc_ssize_t>(s.size() - at), &cp);
    if (n <= 0) return false;
    at += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace fedlora::common
