// Early-return helpers for absl::Status / absl::StatusOr, in the style of leveldb's straight-line
// error passing.
#ifndef FEDLORA_COMMON_BASE_STATUS_MACROS_H_
#define FEDLORA_COMMON_BASE_STATUS_MACROS_H_

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define FEDLORA_CONCAT_INNER_(a, b) a##b
#define FEDLORA_CONCAT_(a, b) FEDLORA_CONCAT_INNER_(a, b)

// Returns the status from the enclosing function if `expr` is not OK.
#define RETURN_IF_ERROR(expr)                             \
  do {                                                    \
    if (absl::Status _st = (expr); !_st.ok()) return _st; \
  } while (0)

// `ASSIGN_OR_RETURN(auto x, Foo());` declares x from the value of a StatusOr, or returns its error.
#define ASSIGN_OR_RETURN(lhs, expr) \
  ASSIGN_OR_RETURN_IMPL_(FEDLORA_CONCAT_(_status_or_, __LINE__), lhs, expr)
#define ASSIGN_OR_RETURN_IMPL_(tmp, lhs, expr) \
  auto tmp = (expr);                           \
  if (!tmp.ok()) return tmp.status();          \
  lhs = std::move(tmp).value()

#endif  // FEDLORA_COMMON_BASE_STATUS_MACROS_H_
