#include "common/net/tls.h"

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, std::string_view what) {
  auto text = ReadFileToString(path);
  if (!text.ok())
    return absl::InvalidArgumentError(
        StrCat("cannot read the ", what, " ", path, ": ", text.status().message()));
  if (text->find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(StrCat(path, " is not a PEM file (expected the ", what, ")"));
  }
  return text;
}

}  // namespace

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerTlsCredentials(
    const std::string& cert_file, const std::string& key_file, const std::string& client_ca_file) {
  grpc::SslServerCredentialsOptions options(
      client_ca_file.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                             : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ASSIGN_OR_RETURN(std::string cert, ReadPem(cert_file, "server certificate"));
  ASSIGN_OR_RETURN(std::string key, ReadPem(key_file, "server private key"));
  options.pem_key_cert_pairs.push_back({key, cert});
  if (!client_ca_file.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem(client_ca_file, "client CA certificate"));
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientTlsCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file) {
  grpc::SslCredentialsOptions options;
  ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem(ca_file, "CA certificate"));
  if (!cert_file.empty()) {
    ASSIGN_OR_RETURN(options.pem_cert_chain, ReadPem(cert_file, "client certificate"));
    ASSIGN_OR_RETURN(options.pem_private_key, ReadPem(key_file, "client private key"));
  }
  return grpc::SslCredentials(options);
}

}  // namespace fedlora::common
