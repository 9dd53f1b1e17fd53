#include "server/state_store.h"

#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/blob.h"
#include "server/errors.h"

namespace fedlora::server {
namespace fs = std::filesystem;
using common::StrCat;

std::string StorageHint(const absl::Status& status, const fs::path& dir) {
  if (absl::IsResourceExhausted(status)) {
    return StrCat("the disk holding ", dir.string(),
                  " is full: free space there; nothing is lost meanwhile");
  }
  if (absl::IsPermissionDenied(status)) return StrCat("make ", dir.string(), " writable");
  return StrCat("check the disk and file system of ", dir.string());
}

absl::Status StateStore::Unavailable(std::string_view what, const absl::Status& status) const {
  spdlog::error("cannot store {}: {}; {}", what, status.message(), StorageHint(status, dir_));
  return WithReason(absl::UnavailableError(StrCat("the coordinator cannot store ", what, " now (",
                                                  status.message(), "); retry later")),
                    v1::ErrorDetail::RETRY_LATER);
}

absl::StatusOr<StateStore> StateStore::Open(const fs::path& dir, common::Env* env) {
  // Nothing the coordinator reads or writes there is reached through a link: a link could make it
  // serve, copy or replace a file of someone else's.
  for (const char* entry :
       {"ledger.json", "metrics.jsonl", "removed.json", "blobs", "incoming", "export"}) {
    if (absl::Status st = common::RefuseLink(dir / entry); !st.ok())
      return absl::FailedPreconditionError(
          StrCat("state directory ", dir.string(), ": ", st.message()));
  }
  // Partial uploads of a previous process are dropped: their round is redone.
  absl::Status st = env->CreateDirectories(dir / "blobs");
  if (st.ok()) st = env->RemoveAll(dir / "incoming");
  if (st.ok()) st = env->CreateDirectories(dir / "incoming");
  if (!st.ok()) {
    return absl::FailedPreconditionError(
        StrCat("cannot prepare state directory ", dir.string(), ": ", st.message()));
  }
  StateStore store;
  store.dir_ = dir;
  store.env_ = env;
  ASSIGN_OR_RETURN(store.removals_,
                   common::ReadStringMap(dir / "removed.json", "client → why it was removed"));
  const fs::path ledger = dir / "ledger.json";
  if (!fs::exists(ledger)) {
    if (!store.removals_.empty()) {
      return absl::FailedPreconditionError(
          StrCat("state directory ", dir.string(),
                 " holds removed.json but no ledger.json: the "
                 "removals belong to a run that is gone; delete removed.json to start a new one"));
    }
    return store;
  }
  ASSIGN_OR_RETURN(Ledger loaded, common::ReadLedger(ledger));
  for (const Version& v : loaded.versions) {
    for (const BlobRef& b : v.blobs) {
      if (!fs::exists(dir / "blobs" / b.sha256)) {
        return absl::DataLossError(StrCat(ledger.string(), " names blob ", b.sha256, " (version ",
                                          v.version, ") but blobs/ does not hold it"));
      }
    }
  }
  store.ledger_ = std::make_shared<const Ledger>(std::move(loaded));
  return store;
}

absl::Status StateStore::AddOperatorRemoval(const std::string& client, const std::string& why) {
  common::StringMap next = removals_;
  next[client] = why;
  RETURN_IF_ERROR(common::WriteStringMap(dir_ / "removed.json", next, env_));
  removals_ = std::move(next);
  return absl::OkStatus();
}

absl::StatusOr<BlobRef> StateStore::PutBlob(std::string_view bytes, BlobKind kind,
                                            int64_t version) {
  BlobRef ref{common::Sha256Hex(bytes), static_cast<int64_t>(bytes.size()), kind, version};
  const fs::path path = dir_ / "blobs" / ref.sha256;
  if (!fs::exists(path)) RETURN_IF_ERROR(common::WriteFileAtomically(path, bytes, env_));
  return ref;
}

absl::StatusOr<std::pair<std::string, int64_t>> StateStore::ReadBlob(const std::string& sha256,
                                                                     int64_t offset,
                                                                     int64_t max_bytes) const {
  if (!common::IsSha256Hex(sha256))
    return absl::InvalidArgumentError(StrCat("'", sha256, "' is not a sha256 (64 hex digits)"));
  const fs::path path = dir_ / "blobs" / sha256;
  // Not through a link (RefuseLink): the blob itself, or nothing.
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) {
    if (errno == ENOENT) return absl::NotFoundError(StrCat("no blob ", sha256));
    return common::ErrnoError("cannot open blob", path, errno);
  }
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(StrCat("cannot read blob ", sha256));
  }
  const int64_t total = static_cast<int64_t>(st.st_size);
  if (offset < 0 || offset > total) {
    ::close(fd);
    return absl::OutOfRangeError(
        StrCat("offset ", offset, " is outside blob ", sha256, " of ", total, " bytes"));
  }
  const int64_t n = std::min<int64_t>(max_bytes, total - offset);
  std::string data(static_cast<size_t>(n), '\0');
  const ssize_t got = ::pread(fd, data.data(), static_cast<size_t>(n), offset);
  ::close(fd);
  if (got != n) return absl::InternalError(StrCat("cannot read blob ", sha256));
  return std::make_pair(std::move(data), total);
}

absl::StatusOr<common::MappedFile> StateStore::MapBlob(const std::string& sha256) const {
  if (!common::IsSha256Hex(sha256))
    return absl::InvalidArgumentError(StrCat("'", sha256, "' is not a sha256 (64 hex digits)"));
  return common::MappedFile::Open(dir_ / "blobs" / sha256, common::Symlinks::kRefuse);
}

absl::StatusOr<std::string> StateStore::ReadWholeBlob(const std::string& sha256) const {
  ASSIGN_OR_RETURN(auto chunk, ReadBlob(sha256, 0, INT64_MAX));
  return std::move(chunk.first);
}

absl::Status StateStore::StartPart(const std::string& name) {
  return env_->WriteFile(dir_ / "incoming" / name, [](std::FILE*) { return absl::OkStatus(); });
}

absl::Status StateStore::WritePart(const std::string& name, int64_t offset, std::string_view data) {
  return env_->WriteAt(dir_ / "incoming" / name, offset, data);
}

absl::StatusOr<common::MappedFile> StateStore::MapPart(const std::string& name) const {
  return common::MappedFile::Open(dir_ / "incoming" / name, common::Symlinks::kRefuse);
}

absl::Status StateStore::SyncPart(const std::string& name) const {
  return env_->Sync(dir_ / "incoming" / name);
}

absl::Status StateStore::AdoptPart(const std::string& name, const std::string& sha256) {
  RETURN_IF_ERROR(env_->Rename(dir_ / "incoming" / name, dir_ / "blobs" / sha256));
  return env_->Sync(dir_ / "blobs");
}

void StateStore::DropPart(const std::string& name) {
  env_->RemoveAll(dir_ / "incoming" / name).IgnoreError();
}

void StateStore::DropBlob(const std::string& sha256) {
  if (!common::IsSha256Hex(sha256) || (ledger_ && ledger_->HoldsBlob(sha256))) return;
  env_->RemoveAll(dir_ / "blobs" / sha256).IgnoreError();
}

absl::Status StateStore::SaveLedger(const Ledger& ledger) {
  RETURN_IF_ERROR(
      common::WriteFileAtomically(dir_ / "ledger.json", ledger.ToJson().dump(2) + "\n", env_));
  ledger_ = std::make_shared<const Ledger>(ledger);
  return absl::OkStatus();
}

}  // namespace fedlora::server
