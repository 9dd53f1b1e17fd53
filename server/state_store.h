// The coordinator's durable state, in one directory:
//   blobs/<sha256>   content-addressed blobs (safetensors), written atomically, never modified
//   ledger.json      the run and its versions (server/ledger.h), rewritten atomically; saving it
//                    is the single point at which a round becomes done
//   metrics.jsonl    one JSON object per closed round, derived from the ledger (rewritten
//                    atomically, so a reader never sees half a line)
//   incoming/        uploads being received, one file per (round, client); cleared on open
//   export/          the exports (server/exporter.h)
// Every write goes through the Env given to Open. A restart on the same directory continues from
// the last version in the ledger.
#ifndef FEDLORA_SERVER_STATE_STORE_H_
#define FEDLORA_SERVER_STATE_STORE_H_

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "common/base/env.h"
#include "common/base/file_util.h"
#include "server/ledger.h"

namespace fedlora::server {

// What an operator can do about a failed write to the state directory `dir`.
std::string StorageHint(const absl::Status& status, const std::filesystem::path& dir);

class StateStore {
 public:
  // Opens (creating if needed) the directory; loads the ledger and metrics if there are any, and
  // checks that every blob the ledger names is there. `env` must outlive the store.
  static absl::StatusOr<StateStore> Open(const std::filesystem::path& dir, common::Env* env);

  bool has_ledger() const { return has_ledger_; }
  const Ledger& ledger() const { return ledger_; }

  // Stores `bytes` as a blob (nothing to do if it exists) and returns its reference.
  absl::StatusOr<BlobRef> PutBlob(std::string_view bytes, BlobKind kind, int64_t version);
  // Up to `max_bytes` of blob `sha256` from `offset`, and its total size.
  absl::StatusOr<std::pair<std::string, int64_t>> ReadBlob(const std::string& sha256,
                                                           int64_t offset, int64_t max_bytes) const;
  absl::StatusOr<std::string> ReadWholeBlob(const std::string& sha256) const;

  // Replaces the ledger on disk atomically, then in memory; on failure both stay as they were.
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

  // The version of the last metrics line (0 when there is none).
  int64_t metrics_version() const { return metrics_version_; }
  // Adds the line of `version` to metrics.jsonl (rewritten atomically, so a crash never leaves half
  // a line); on failure the file and memory stay as they were.
  absl::Status AppendMetrics(int64_t version, const nlohmann::json& line);

  const std::filesystem::path& dir() const { return dir_; }
  common::Env* env() const { return env_; }
  // A write of `what` that failed with `status`, as a peer should see it: UNAVAILABLE (the
  // coordinator's disk, not the peer, is at fault, so it should retry), with the reason. Logged
  // with the hint for the operator.
  absl::Status Unavailable(std::string_view what, const absl::Status& status) const;

 private:
  std::filesystem::path dir_;
  common::Env* env_ = nullptr;
  bool has_ledger_ = false;
  Ledger ledger_;
  std::vector<std::string> metrics_;
  int64_t metrics_version_ = 0;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_STATE_STORE_H_
