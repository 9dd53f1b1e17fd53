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

// The operator's CA in `dir` (ca.pem, ca.key, and issued.json, the record of what it signed) and
// the coordinator's certificate (server.pem, server.key) for `server_names`: the DNS names and IP
// addresses clients dial. Refuses a directory that holds a CA already.
absl::Status InitAuthority(const std::filesystem::path& dir,
                           const std::vector<std::string>& server_names, int days = 825);

// A site's private key <dir>/<cn>.key (mode 0600 from its first byte; it never leaves) and the
// signing request <dir>/<cn>.csr to send to the operator. Refuses to replace either.
absl::Status RequestCertificate(const std::filesystem::path& dir, const std::string& cn);

struct SignOptions {
  std::set<std::string> allowed;  // the names that may be issued: allow-list and operators
  bool reissue = false;           // sign a name that holds a certificate already (rotation)
  int days = 825;
};
// The operator signs the request `csr_file` with the CA of `ca_dir`, for client authentication,
// into `out` (PEM), and records it in issued.json. Refused: a request whose signature does not
// verify, a common name not in `allowed`, or one issued before and not revoked (without reissue).
absl::StatusOr<CertificateId> SignRequest(const std::filesystem::path& ca_dir,
                                          const std::filesystem::path& csr_file,
                                          const std::filesystem::path& out,
                                          const SignOptions& options);

// Revokes the certificates issued to `cn` (only the one with `serial`, upper-case hex, when given)
// and writes <ca_dir>/crl.pem, which lists every certificate the CA revoked, signed by it. Returns
// the serials revoked now; NOT_FOUND when there was none to revoke.
absl::StatusOr<std::vector<std::string>> Revoke(const std::filesystem::path& ca_dir,
                                                const std::string& cn, const std::string& serial);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_NET_CERTS_H_
