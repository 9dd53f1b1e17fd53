// The coordinator's durable state, in one directory:
//   blobs/<sha256>   content-addressed blobs (safetensors), written atomically, never modified
//   ledger.json      the run and its versions (common/run/ledger.h), rewritten atomically; saving
//                    it is the single point at which a round becomes done
//   incoming/        uploads being received, one file per (round, client); cleared on open
// and, written by the follow-up (server/follow_up.h): metrics.jsonl (server/metrics_log.h) and
// export/ (server/exporter.h). Every write goes through the Env given to Open. A restart on the
// same directory continues from the last version in the ledger. Reading blobs and parts is safe
// from any thread; the rest belongs to the engine's lock.
#ifndef FEDLORA_SERVER_STATE_STORE_H_
#define FEDLORA_SERVER_STATE_STORE_H_

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/env.h"
#include "common/base/file_util.h"
#include "common/run/ledger.h"

namespace fedlora::server {

using common::BlobKind;
using common::BlobRef;
using common::ClientDpState;
using common::FedSbInit;
using common::Ledger;
using common::ModuleSpec;
using common::Version;

// What an operator can do about a failed write to the state directory `dir`.
std::string StorageHint(const absl::Status& status, const std::filesystem::path& dir);

class StateStore {
 public:
  // Opens (creating if needed) the directory; loads the ledger if there is one, and
  // checks that every blob the ledger names is there. `env` must outlive the store.
  static absl::StatusOr<StateStore> Open(const std::filesystem::path& dir, common::Env* env);

  bool has_ledger() const { return ledger_ != nullptr; }
  const Ledger& ledger() const { return *ledger_; }
  // The ledger as it is now, for a reader on another thread (it never changes; a save makes a new
  // one).
  std::shared_ptr<const Ledger> snapshot() const { return ledger_; }

  // Stores `bytes` as a blob (nothing to do if it exists) and returns its reference.
  absl::StatusOr<BlobRef> PutBlob(std::string_view bytes, BlobKind kind, int64_t version);
  // Up to `max_bytes` of blob `sha256` from `offset`, and its total size.
  absl::StatusOr<std::pair<std::string, int64_t>> ReadBlob(const std::string& sha256,
                                                           int64_t offset, int64_t max_bytes) const;
  absl::StatusOr<std::string> ReadWholeBlob(const std::string& sha256) const;
  // Blob `sha256` mapped read-only: for decoding a large blob without a copy of it.
  absl::StatusOr<common::MappedFile> MapBlob(const std::string& sha256) const;

  // Replaces the ledger on disk atomically, then in memory; on failure memory keeps the old one and
  // disk holds the old or, when only the directory's fsync failed, the new one — either of which a
  // restart continues from.
  absl::Status SaveLedger(const Ledger& ledger);

  // Partial uploads, spooled to incoming/<name> so memory does not grow with the cohort. StartPart
  // creates (or empties) the file; WritePart writes `data` at `offset` in it (chunks may come in
  // any order).
  absl::Status StartPart(const std::string& name);
  absl::Status WritePart(const std::string& name, int64_t offset, std::string_view data);
  // MapPart and SyncPart (fsync) only read the file: they are safe without the engine's lock while
  // no chunk is written to it.
  absl::StatusOr<common::MappedFile> MapPart(const std::string& name) const;
  absl::Status SyncPart(const std::string& name) const;
  // Moves a complete, verified and synced part into blobs/<sha256> (renamed, not copied; the rename
  // is synced).
  absl::Status AdoptPart(const std::string& name, const std::string& sha256);
  void DropPart(const std::string& name);
  // Deletes blob `sha256` unless the ledger names it (an accepted upload no version records).
  void DropBlob(const std::string& sha256);

  // The clients operators removed, and why (removed.json, rewritten atomically at each removal):
  // a removal outlasts a restart even before the round it is recorded with commits.
  const std::map<std::string, std::string>& operator_removals() const { return removals_; }
  absl::Status AddOperatorRemoval(const std::string& client, const std::string& why);

  const std::filesystem::path& dir() const { return dir_; }
  common::Env* env() const { return env_; }
  // A write of `what` that failed with `status`, as a peer should see it: UNAVAILABLE (the
  // coordinator's disk, not the peer, is at fault, so it should retry), with the reason. Logged
  // with the hint for the operator.
  absl::Status Unavailable(std::string_view what, const absl::Status& status) const;

 private:
  std::filesystem::path dir_;
  common::Env* env_ = nullptr;
  std::shared_ptr<const Ledger> ledger_;
  std::map<std::string, std::string> removals_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_STATE_STORE_H_
