// The certificates of a run on one machine, as deploy/make_certs.sh makes them with the openssl
// program: a CA, a server certificate for localhost and 127.0.0.1, and client certificates whose
// common names (client-1 … client-N) are the clients' identities. ECDSA P-256, SHA-256, valid for
// 825 days from an hour ago. For `fedlora experiment`, which must run where no script is.
#ifndef FEDLORA_COMMON_NET_CERTS_H_
#define FEDLORA_COMMON_NET_CERTS_H_

#include <filesystem>

#include "absl/status/status.h"

namespace fedlora::common {

// Writes ca.pem, ca.key, server.pem, server.key and client-<k>.pem/.key for k = 1..clients into
// `dir` (created if missing, mode 0700; keys 0600), each atomically. Files that exist are kept, so
// more clients can be added to a directory later.
absl::Status MakeRunCertificates(const std::filesystem::path& dir, int clients);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_NET_CERTS_H_
