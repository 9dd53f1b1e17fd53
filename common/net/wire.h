// The wire's enums (proto/fedlora/v1) and their counterparts in common/: a method and a blob kind
// travel as enums, never as names a peer must spell right.
#ifndef FEDLORA_COMMON_NET_WIRE_H_
#define FEDLORA_COMMON_NET_WIRE_H_

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "common/run/ledger.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::common {

fedlora::v1::Method ToWire(Method method);
fedlora::v1::BlobKind ToWire(BlobKind kind);
// INVALID_ARGUMENT for an unspecified or unknown value (a peer of another version).
absl::StatusOr<Method> FromWire(fedlora::v1::Method method);
absl::StatusOr<BlobKind> FromWire(fedlora::v1::BlobKind kind);
// "fedit", …; "unknown method N" for a value this program does not know.
std::string MethodNameOf(fedlora::v1::Method method);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_NET_WIRE_H_
