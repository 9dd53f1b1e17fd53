// The kind of a refusal that a client acts on (v1::ErrorDetail::Reason): attached to an
// absl::Status as a payload here, and sent as the gRPC status's details by the service
// (coordinator_service.cc), so that no client parses message text.
#ifndef FEDLORA_SERVER_ERRORS_H_
#define FEDLORA_SERVER_ERRORS_H_

#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/cord.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::server {

inline constexpr char kErrorDetailUrl[] = "type.googleapis.com/fedlora.v1.ErrorDetail";

inline absl::Status WithReason(absl::Status status, v1::ErrorDetail::Reason reason) {
  v1::ErrorDetail detail;
  detail.set_reason(reason);
  status.SetPayload(kErrorDetailUrl, absl::Cord(detail.SerializeAsString()));
  return status;
}

// The detail attached by WithReason, if any.
inline std::optional<v1::ErrorDetail> DetailOf(const absl::Status& status) {
  const auto payload = status.GetPayload(kErrorDetailUrl);  // absl::optional here
  v1::ErrorDetail detail;
  if (!payload || !detail.ParseFromString(std::string(*payload))) return std::nullopt;
  return detail;
}

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_ERRORS_H_
