#include "server/update_validator.h"

#include <future>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/blob.h"

namespace fedlora::server {

using common::StrCat;

absl::StatusOr<common::Adapter> UpdateValidator::Decode(std::string_view bytes,
                                                        const std::string& origin, int rank) const {
  common::Adapter update;
  if (method_ == common::Method::kFedSb) {
    ASSIGN_OR_RETURN(update, common::DecodeROnto(bytes, origin, frozen_));
    RETURN_IF_ERROR(update.CheckFinite());
    return update;
  }
  ASSIGN_OR_RETURN(update, common::DecodeAdapter(bytes, origin));
  if (rank > 0 && !shapes_.empty() && rank != shapes_[0].rank) {
    // Another rank than the run's, at the same lora_alpha.
    std::vector<common::ModuleShape> shapes = shapes_;
    for (common::ModuleShape& s : shapes) s.rank = rank;
    RETURN_IF_ERROR(common::CheckShapes(update, shapes, origin, scaling_ * shapes_[0].rank / rank));
  } else {
    RETURN_IF_ERROR(common::CheckShapes(update, shapes_, origin, scaling_));
  }
  return update;
}

absl::Status VerifyPart(const StateStore& store, const std::string& part, const std::string& sha256,
                        const std::string& origin,
                        const std::function<absl::Status(std::string_view bytes)>& decode) {
  absl::StatusOr<common::MappedFile> mapped_or = store.MapPart(part);
  if (!mapped_or.ok()) return store.Unavailable(origin, mapped_or.status());
  const common::MappedFile& mapped = *mapped_or;
  const std::string_view bytes(reinterpret_cast<const char*>(mapped.bytes().data()),
                               mapped.bytes().size());
  auto hashed = std::async(std::launch::async, [&]() -> absl::StatusOr<std::string> {
    std::string sha = common::Sha256Hex(bytes);
    if (absl::Status st = store.SyncPart(part); !st.ok()) return store.Unavailable(origin, st);
    return sha;
  });
  const absl::Status decoded = decode(bytes);
  ASSIGN_OR_RETURN(const std::string sha, hashed.get());
  if (sha != sha256) {
    return absl::InvalidArgumentError(StrCat("checksum mismatch: the update's sha256 is ", sha,
                                             " but the upload announced ", sha256));
  }
  return decoded;
}

absl::StatusOr<common::Adapter> UpdateValidator::Verify(const StateStore& store,
                                                        const std::string& part,
                                                        const std::string& sha256,
                                                        const std::string& origin, int rank) const {
  absl::StatusOr<common::Adapter> update;
  RETURN_IF_ERROR(VerifyPart(store, part, sha256, origin, [&](std::string_view bytes) {
    update = Decode(bytes, origin, rank);
    return update.status();
  }));
  return update;
}

}  // namespace fedlora::server
