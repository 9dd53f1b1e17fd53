#include "server/intake/uploads.h"

#include <algorithm>
#include <cctype>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "server/errors.h"

namespace fedlora::server {

using common::StrCat;

void ByteRanges::AddRange(int64_t begin, int64_t end) {
  auto it = ranges_.upper_bound(begin);
  if (it != ranges_.begin() && std::prev(it)->second >= begin) {
    --it;
    begin = it->first;
    end = std::max(end, it->second);
    it = ranges_.erase(it);
  }
  while (it != ranges_.end() && it->first <= end) {
    end = std::max(end, it->second);
    it = ranges_.erase(it);
  }
  ranges_[begin] = end;
}

int64_t ByteRanges::Prefix() const {
  return !ranges_.empty() && ranges_.begin()->first == 0 ? ranges_.begin()->second : 0;
}

std::string PartName(int64_t round, const std::string& client) {
  std::string name = StrCat("round", round, "-");
  for (char c : client) {
    name.push_back(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' ? c : '_');
  }
  // The hash keeps apart identities that the replacement maps alike.
  return name + "-" + fmt::format("{:016x}", common::Fnv1a(client));
}

absl::StatusOr<v1::UploadResponse> Uploads::Receive(int64_t round, const std::string& client,
                                                    const v1::UploadRequest& request,
                                                    bool* complete) {
  *complete = false;
  v1::UploadResponse response;
  PendingUpload& up = uploads_[client];
  if (up.verifying) {  // its part file must not change until it has been checked
    return WithReason(absl::UnavailableError(StrCat(client, "'s update for round ", round,
                                                    " is being verified; retry")),
                      v1::ErrorDetail::RETRY_LATER);
  }
  if (up.accepted) {
    if (up.sha256 != request.sha256()) {
      return WithReason(absl::AlreadyExistsError(StrCat("an update for round ", round,
                                                        " was already accepted from ", client,
                                                        " (sha256 ", up.sha256, ")")),
                        v1::ErrorDetail::REJECTED);
    }
    response.set_received(up.total_size);  // an idempotent retry
    response.set_accepted(true);
    return response;
  }
  const std::string part = PartName(round, client);
  if (up.sha256 != request.sha256() || up.total_size != request.total_size()) {
    up = PendingUpload{request.sha256(), request.total_size()};  // a new upload
    if (absl::Status st = store_->StartPart(part); !st.ok()) {
      uploads_.erase(client);
      return store_->Unavailable(StrCat(client, "'s update"), st);
    }
  }
  const int64_t begin = request.offset();
  const int64_t size = static_cast<int64_t>(request.data().size());
  // Compared without forming begin + size, which a hostile offset near 2^63 overflows.
  if (begin < 0 || begin > up.total_size || size > up.total_size - begin) {
    Drop(round, client);
    return WithReason(absl::InvalidArgumentError(StrCat("chunk of ", size, " bytes at offset ",
                                                        begin, " is outside the announced size of ",
                                                        request.total_size(), " bytes")),
                      v1::ErrorDetail::REJECTED);
  }
  const int64_t end = begin + size;
  if (end > begin) {
    if (absl::Status st = store_->WritePart(part, begin, request.data()); !st.ok())
      return store_->Unavailable(StrCat(client, "'s update"), st);
    up.ranges.AddRange(begin, end);
    up.received = up.ranges.Prefix();
  }
  response.set_received(up.received);
  if (up.received == up.total_size) {
    up.verifying = true;
    *complete = true;
  }
  return response;
}

absl::Status Uploads::Accept(int64_t round, const std::string& client, int64_t weight, double norm,
                             const v1::TrainMetrics& metrics) {
  PendingUpload& up = uploads_.at(client);
  up.verifying = false;
  RETURN_IF_ERROR(store_->AdoptPart(PartName(round, client), up.sha256));
  up.accepted = true;
  ++arrived_;
  up.weight = weight;
  up.norm = norm;
  up.metrics = metrics;
  return absl::OkStatus();
}

void Uploads::Drop(int64_t round, const std::string& client) {
  auto it = uploads_.find(client);
  if (it == uploads_.end()) return;
  if (it->second.accepted) --arrived_;
  uploads_.erase(it);
  store_->DropPart(PartName(round, client));
}

void Uploads::Clear(int64_t round) {
  for (const auto& [id, u] : uploads_) {
    if (!u.accepted) store_->DropPart(PartName(round, id));
  }
  uploads_.clear();
  arrived_ = 0;
}

const PendingUpload* Uploads::Find(const std::string& client) const {
  auto it = uploads_.find(client);
  return it == uploads_.end() ? nullptr : &it->second;
}

bool Uploads::Accepted(const std::string& client) const {
  const PendingUpload* up = Find(client);
  return up != nullptr && up->accepted;
}

bool Uploads::AnyVerifying() const {
  return std::any_of(uploads_.begin(), uploads_.end(),
                     [](const auto& entry) { return entry.second.verifying; });
}

std::vector<std::string> Uploads::ArrivedIds() const {
  std::vector<std::string> ids;
  for (const auto& [id, u] : uploads_) {
    if (u.accepted) ids.push_back(id);
  }
  return ids;
}

std::vector<AcceptedUpdate> Uploads::AcceptedUpdates() const {
  std::vector<AcceptedUpdate> out;
  for (const auto& [id, u] : uploads_) {
    if (u.accepted) out.push_back({id, u.sha256, u.weight, u.norm});
  }
  return out;
}

}  // namespace fedlora::server
