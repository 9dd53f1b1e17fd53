// Certificates on OpenSSL's API, no shell calls. Two ways to make them:
// - A run on one machine (`fedlora experiment`, like deploy/make_certs.sh): every key in one
//   directory, MakeRunCertificates.
// - A real federation, where no key leaves the machine it was made on: the operator makes the CA
//   and the coordinator's certificate (InitAuthority); a site makes its key and a signing request
//   (RequestCertificate) and sends the request; the operator signs it (SignRequest), refusing a
//   name that is not on the allow-list or already issued, and revokes what must go (Revoke: a CRL
//   for the coordinator's --crl).
// Keys are ECDSA P-256, signatures SHA-256; certificates are valid from an hour ago (clock skew).
#ifndef FEDLORA_COMMON_NET_CERTS_H_
#define FEDLORA_COMMON_NET_CERTS_H_

#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/net/revocation.h"

namespace fedlora::common {

// Writes ca.pem, ca.key, server.pem, server.key (for localhost, 127.0.0.1 and "coordinator") and
// client-<k>.pem/.key for k = 1..clients into `dir` (created if missing, mode 0700; keys 0600),
// each atomically. Files that exist are kept, so more clients can be added to a directory later.
absl::Status MakeRunCertificates(const std::filesystem::path& dir, int clients);

// OK when `cn` can name a client or an operator: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with a
// dot or dash (it names files and ledger entries).
absl::Status CheckCommonName(const std::string& cn);

// The operator's CA in the new directory `dir` (ca.pem; ca.key; issued.json, the record of what it
// signed), built in a temporary directory and renamed into place, so a failure leaves nothing. With
// `server_names` (the DNS names and IP addresses clients dial), also the coordinator's certificate
// and key (server.pem, server.key), for a coordinator on the CA's machine; otherwise the
// coordinator requests one like a site and the CA signs it with SignOptions::server_names.
absl::Status InitAuthority(const std::filesystem::path& dir,
                           const std::vector<std::string>& server_names, int days = 825);

// A private key <dir>/<cn>.key (mode 0600 from its first byte; it never leaves) and the signing
// request <dir>/<cn>.csr to send to the operator. `dir` is created mode 0700 if missing. Refuses to
// replace either file; a failure leaves neither.
absl::Status RequestCertificate(const std::filesystem::path& dir, const std::string& cn);

struct SignOptions {
  std::set<std::string> clients;    // names that may have a client certificate (allow-list)
  std::set<std::string> operators;  // names that may have an operator's certificate
  bool as_operator = false;         // sign an operator's name (it may act on the run)
  // A coordinator's certificate for these DNS names and IP addresses (empty: a client's).
  std::vector<std::string> server_names;
  bool reissue = false;  // sign a name that holds a certificate already (rotation)
  int days = 825;
};
// The operator signs the request `csr_file` with the CA of `ca_dir` into `out` (PEM) and records it
// in issued.json. The certificate takes only the request's key and common name (no requested
// extension or other name: CA:FALSE, digital signature, client or server authentication). Refused:
// a request whose signature does not verify; a client's name not in `clients`, an operator's not
// in `operators` or without `as_operator`; a name issued before and not revoked (without reissue).
absl::StatusOr<CertificateId> SignRequest(const std::filesystem::path& ca_dir,
                                          const std::filesystem::path& csr_file,
                                          const std::filesystem::path& out,
                                          const SignOptions& options);

// Revokes the certificates issued to `cn` (only the one with `serial`, hex, when given), records
// it, and writes <ca_dir>/crl.pem anew: every certificate the CA revoked, signed by it. Returns the
// serials revoked now; NOT_FOUND when there was none to revoke (the CRL is written all the same).
absl::StatusOr<std::vector<std::string>> Revoke(const std::filesystem::path& ca_dir,
                                                const std::string& cn, const std::string& serial);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_NET_CERTS_H_
