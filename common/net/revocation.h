// What the coordinator checks of a client certificate beyond its chain (which TLS verified): that
// no CRL of its CA revokes it (--crl), and which certificate it is (--pin-client-certs pins an
// identity to the SHA-256 of the certificate it first joined with). OpenSSL only, no gRPC.
#ifndef FEDLORA_COMMON_NET_REVOCATION_H_
#define FEDLORA_COMMON_NET_REVOCATION_H_

#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

// A certificate as the coordinator names it.
struct CertificateId {
  std::string issuer;  // the issuer's name, one line ("/CN=fedlora run CA")
  std::string serial;  // upper-case hex of whole bytes, as OpenSSL writes it
  std::string sha256;  // of the DER encoding, lower-case hex: the certificate's fingerprint
  std::string cn;      // the subject's common name
};

// The first certificate of `pem`; INVALID_ARGUMENT when there is none.
absl::StatusOr<CertificateId> IdentifyCertificate(std::string_view pem);

// The certificates that the CRLs of a PEM file revoke.
class RevocationList {
 public:
  // Reads every CRL of `crl_file` (one or more, PEM). Each must be signed by a CA certificate of
  // `ca_pem` (the client CA bundle, read from `ca_file`), or the file is refused, saying which CRL
  // and whose signature it lacks; so is a file with a damaged block. A CRL past its next update
  // still counts (its revocations stand); `warnings` says so.
  static absl::StatusOr<std::shared_ptr<const RevocationList>> Load(
      const std::string& crl_file, std::string_view ca_pem, const std::string& ca_file,
      std::vector<std::string>* warnings);

  bool Revoked(const CertificateId& cert) const {
    return revoked_.contains(Key(cert.issuer, cert.serial));
  }
  size_t size() const { return revoked_.size(); }
  const std::string& file() const { return file_; }

 private:
  static std::string Key(std::string_view issuer, std::string_view serial) {
    return std::string(issuer) + "#" + std::string(serial);
  }
  std::string file_;
  std::set<std::string> revoked_;  // Key(issuer, serial)
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_NET_REVOCATION_H_
