// TLS material from PEM files, for gRPC credentials on both sides.
#ifndef FEDLORA_COMMON_NET_TLS_H_
#define FEDLORA_COMMON_NET_TLS_H_

#include <grpc/grpc.h>
#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <chrono>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

// The gRPC metadata key that names a client without mutual TLS (--insecure experiments only: the
// coordinator takes the caller's word for it). With mutual TLS the certificate names the client.
inline constexpr char kClientIdMetadata[] = "x-fedlora-client-id";
// The metadata key of the session a Join started (JoinResponse.session), sent with every later
// call.
inline constexpr char kSessionMetadata[] = "x-fedlora-session";

// OpenSSL frees its global state in an atexit handler, and gRPC's threads can still be using it
// when main returns (a resolver building a subchannel's TLS handshaker for a client that is
// leaving): a use-after-free at exit, seen under ASan. Called first in main, before anything
// initialises OpenSSL, this leaves that state to the end of the process.
void KeepOpenSslUntilExit();

// Server: certificate chain and key; with `client_ca`, mutual TLS (clients must present a
// certificate it signed). Both functions refuse a certificate of their own that is expired or not
// yet valid with FAILED_PRECONDITION, saying since or until when.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerTlsCredentials(
    const std::string& cert_file, const std::string& key_file, const std::string& client_ca_file);

// Client: the CA that signed the server's certificate, and optionally the client's own certificate
// and key.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientTlsCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file);

// Why the TLS server at `address` (host:port) refuses this client, found by a handshake of its own
// with the same CA, certificate and key (gRPC reports a refusal of the client's certificate only
// as "Socket closed", the same as a server that went away). PERMISSION_DENIED, saying why, when the
// server closes the connection right after the handshake (what gRPC's server does to a certificate
// it refuses), sends an alert, or has a certificate `ca_file` does not vouch for; OK when it is
// accepted; UNAVAILABLE when it cannot tell (no connection within `timeout`).
absl::Status ProbeTlsRefusal(const std::string& address, const std::string& ca_file,
                             const std::string& cert_file, const std::string& key_file,
                             std::chrono::milliseconds timeout = std::chrono::seconds(5));

// Channel arguments both ends set. Messages of a chunk and 1 MiB to spare (`chunk_bytes` is the
// transfer chunk). Megabyte chunks cross in few, large frames: TLS records of up to 1 MiB (gRPC's
// default is 16 KiB, which made encryption framing the bottleneck), HTTP/2 frames of 1 MiB and an
// 8 MiB stream window; on loopback with mutual TLS this doubles upload throughput
// (tests/bench/README.md), and each side uses the smaller of the two ends' values. Keepalive pings
// every 30 s, answered within 10 s, find a dead peer on an idle connection.
inline std::vector<std::pair<const char*, int>> TransportChannelArgs(int64_t chunk_bytes) {
  const int max_message = static_cast<int>(chunk_bytes + (1 << 20));
  return {{GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH, max_message},
          {GRPC_ARG_MAX_SEND_MESSAGE_LENGTH, max_message},
          {GRPC_ARG_TSI_MAX_FRAME_SIZE, 1 << 20},
          {GRPC_ARG_HTTP2_MAX_FRAME_SIZE, 1 << 20},
          {GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 8 << 20},
          {GRPC_ARG_KEEPALIVE_TIME_MS, 30000},
          {GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10000}};
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_NET_TLS_H_
