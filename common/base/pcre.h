// A compiled PCRE2 pattern (8-bit, UTF) with its match data, for the tokenizer's regexes and the
// PEFT config's rank/alpha patterns. Link PCRE2 (pkg-config libpcre2-8) where this is used.
#ifndef FEDLORA_COMMON_BASE_PCRE_H_
#define FEDLORA_COMMON_BASE_PCRE_H_

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <array>
#include <string_view>
#include <utility>

#include "absl/status/statusor.h"
#include "common/base/strings.h"

namespace fedlora::common {

// Matching writes into `match`: one thread at a time per Pcre.
struct Pcre {
  pcre2_code* code = nullptr;
  pcre2_match_data* match = nullptr;

  Pcre() = default;
  Pcre(Pcre&& o) noexcept
      : code(std::exchange(o.code, nullptr)), match(std::exchange(o.match, nullptr)) {}
  Pcre& operator=(Pcre&& o) noexcept {
    std::swap(code, o.code);
    std::swap(match, o.match);
    return *this;
  }
  ~Pcre() {
    if (match != nullptr) pcre2_match_data_free(match);
    if (code != nullptr) pcre2_code_free(code);
  }
};

// Compiles `pattern` with PCRE2_UTF and `options`; with `jit`, JIT-compiles it too (an
// optimisation: matching works without it, and limits set in a match context apply only
// without). The error names `what`, the offset and PCRE2's message.
inline absl::StatusOr<Pcre> CompilePcre(std::string_view pattern, uint32_t options, bool jit,
                                        std::string_view what) {
  int error = 0;
  PCRE2_SIZE offset = 0;
  Pcre re;
  re.code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                          PCRE2_UTF | options, &error, &offset, nullptr);
  if (re.code == nullptr) {
    std::array<PCRE2_UCHAR, 256> message{};
    pcre2_get_error_message(error, message.data(), message.size());
    return absl::InvalidArgumentError(StrCat(what, " ", pattern, " does not compile at offset ",
                                             offset, ": ",
                                             reinterpret_cast<const char*>(message.data())));
  }
  if (jit) pcre2_jit_compile(re.code, PCRE2_JIT_COMPLETE);
  re.match = pcre2_match_data_create_from_pattern(re.code, nullptr);
  return re;
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_PCRE_H_
