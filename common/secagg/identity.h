// Signatures with the clients' TLS keys, so that what the coordinator relays between clients (their
// public keys, their consent to a survivor set) cannot be forged or swapped by it: a client signs
// with the private key of its TLS certificate, and a neighbour checks the signature against the
// certificate, the certificate against the CA, and the certificate's common name against the
// client it claims to be. SHA-256 with the key's own scheme (ECDSA, RSA PKCS #1 v1.5; Ed25519 as
// is), all OpenSSL 3's.
#ifndef FEDLORA_COMMON_SECAGG_IDENTITY_H_
#define FEDLORA_COMMON_SECAGG_IDENTITY_H_

#include <initializer_list>
#include <memory>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace fedlora::secagg {

// An unambiguous encoding of `parts` to sign: each as its 8-byte little-endian length and bytes.
std::string SignedBytes(std::initializer_list<std::string_view> parts);

class Signer {
 public:
  // The private key of a PEM file (a TLS key).
  static absl::StatusOr<Signer> FromPemFile(const std::string& key_file);
  static absl::StatusOr<Signer> FromPem(std::string_view key_pem);
  absl::StatusOr<std::string> Sign(std::string_view message) const;

 private:
  struct Key;
  explicit Signer(std::shared_ptr<const Key> key) : key_(std::move(key)) {}
  std::shared_ptr<const Key> key_;
};

class PeerVerifier {
 public:
  // Trusts the CA certificates of a PEM text (one or more).
  static absl::StatusOr<PeerVerifier> FromCaPem(std::string_view ca_pem);
  // OK when `certificate` (PEM) is valid now, was issued by a trusted CA for a TLS client (not a
  // server certificate of the same CA, such as the coordinator's), has `client` as its
  // common name, and `signature` is its key's over `message`; PERMISSION_DENIED saying which
  // check failed otherwise.
  absl::Status Verify(std::string_view client, std::string_view certificate,
                      std::string_view message, std::string_view signature) const;

 private:
  struct Store;
  explicit PeerVerifier(std::shared_ptr<const Store> store) : store_(std::move(store)) {}
  std::shared_ptr<const Store> store_;
};

}  // namespace fedlora::secagg

#endif  // FEDLORA_COMMON_SECAGG_IDENTITY_H_
