// TLS material from PEM files, for gRPC credentials on both sides.
#ifndef FEDLORA_COMMON_TLS_H_
#define FEDLORA_COMMON_TLS_H_

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace fedlora::common {

// Server: certificate chain and key; with `client_ca`, mutual TLS (clients must present a
// certificate it signed).
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerTlsCredentials(
    const std::string& cert_file, const std::string& key_file, const std::string& client_ca_file);

// Client: the CA that signed the server's certificate, and optionally the client's own certificate
// and key.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientTlsCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TLS_H_
