// --pin-client-certs: each identity is admitted only with the certificate (SHA-256 of its DER) it
// first joined with (an operator: first called with), so that a certificate reissued for the same
// name, by mistake or by someone holding the CA's key, is not admitted until an operator says so
// (`fedlora-client --admin unpin --admin-client NAME`).
// The pins are the state directory's pins.json, rewritten atomically at each change, so a restart
// keeps them.
#ifndef FEDLORA_SERVER_CERT_PINS_H_
#define FEDLORA_SERVER_CERT_PINS_H_

#include <filesystem>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/base/env.h"

namespace fedlora::server {

class CertPins {
 public:
  // Reads <state_dir>/pins.json (none: no pins yet); a link or a malformed file is refused.
  static absl::StatusOr<std::unique_ptr<CertPins>> Open(const std::filesystem::path& state_dir,
                                                        common::Env* env);

  // OK when `client` is pinned to `sha256`, or has no pin and `join` (this join pins it);
  // PERMISSION_DENIED (ErrorDetail CERTIFICATE) otherwise, naming both fingerprints and the way to
  // admit the new certificate. UNAVAILABLE when a new pin cannot be written (it is not taken).
  absl::Status Check(const std::string& client, const std::string& sha256, bool join)
      ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets `client`'s pin; NOT_FOUND when it has none.
  absl::Status Unpin(const std::string& client) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  CertPins(std::filesystem::path file, common::Env* env) : file_(std::move(file)), env_(env) {}
  absl::Status Save() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::filesystem::path file_;
  common::Env* const env_;
  absl::Mutex mu_;
  std::map<std::string, std::string> pins_ ABSL_GUARDED_BY(mu_);  // client → sha256
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_CERT_PINS_H_
