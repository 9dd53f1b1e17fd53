#include "server/cert_pins.h"

#include <spdlog/spdlog.h>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "server/errors.h"

namespace fedlora::server {

using common::StrCat;

absl::StatusOr<std::unique_ptr<CertPins>> CertPins::Open(const std::filesystem::path& state_dir,
                                                         common::Env* env) {
  std::unique_ptr<CertPins> pins(new CertPins(state_dir / "pins.json", env));
  auto loaded = common::ReadStringMap(pins->file_, "client → certificate SHA-256");
  if (absl::IsDataLoss(loaded.status())) {
    return absl::FailedPreconditionError(
        StrCat(loaded.status().message(),
               "; restore it from a backup, or delete it to pin every client afresh"));
  }
  RETURN_IF_ERROR(loaded.status());
  absl::MutexLock lock(&pins->mu_);
  pins->pins_ = *std::move(loaded);
  return pins;
}

absl::Status CertPins::Save() { return common::WriteStringMap(file_, pins_, env_); }

absl::Status CertPins::Check(const std::string& client, const std::string& sha256, bool join) {
  absl::MutexLock lock(&mu_);
  const auto it = pins_.find(client);
  if (it == pins_.end() && join) {
    pins_[client] = sha256;
    if (absl::Status st = Save(); !st.ok()) {
      pins_.erase(client);
      return WithReason(
          absl::UnavailableError(StrCat("the coordinator cannot pin ", client,
                                        "'s certificate now (", st.message(), "); retry later")),
          v1::ErrorDetail::RETRY_LATER);
    }
    spdlog::info("{} is pinned to certificate sha256:{}", client, sha256);
    return absl::OkStatus();
  }
  if (it == pins_.end() || it->second == sha256) return absl::OkStatus();
  return WithReason(
      absl::PermissionDeniedError(StrCat(
          client, " presented certificate sha256:", sha256, "; it is pinned to sha256:", it->second,
          " (--pin-client-certs). If the site's certificate was reissued, an operator admits the "
          "new one with `fedlora-client --admin unpin --admin-client ",
          client,
          "` (an operator's own pin, when no other operator can: stop the coordinator and "
          "delete its entry from pins.json in the state directory)")),
      v1::ErrorDetail::CERTIFICATE);
}

absl::Status CertPins::Unpin(const std::string& client) {
  absl::MutexLock lock(&mu_);
  const auto it = pins_.find(client);
  if (it == pins_.end()) return absl::NotFoundError(StrCat(client, " has no pinned certificate"));
  const std::string old = it->second;
  pins_.erase(it);
  if (absl::Status st = Save(); !st.ok()) {
    pins_[client] = old;
    return absl::UnavailableError(StrCat("cannot write ", file_.string(), ": ", st.message()));
  }
  spdlog::warn(
      "{}'s certificate pin (sha256:{}) was removed by an operator: its next join pins "
      "the certificate it presents",
      client, old);
  return absl::OkStatus();
}

}  // namespace fedlora::server
