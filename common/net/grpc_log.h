// gRPC's own log lines (a failed TLS handshake, a connection reset) through spdlog — the
// process's log, in its format — and through the same rate limiter as fedlora's own events: a
// kind of line (its place in gRPC's source) is written at most once per 10 s, with how many were
// held back. Without it, 2,000 failed handshakes wrote 2,000 lines and slowed an honest run on the
// same machine from 20.9 s to 43.8 s.
#ifndef FEDLORA_COMMON_NET_GRPC_LOG_H_
#define FEDLORA_COMMON_NET_GRPC_LOG_H_

#include <functional>

namespace fedlora::common {

// From now on gRPC logs into spdlog's default logger. `on_handshake_failure` (may be empty) is
// called for each failed TLS handshake, logged or held back. Call before gRPC starts serving.
void RouteGrpcLog(std::function<void()> on_handshake_failure = {});

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_NET_GRPC_LOG_H_
