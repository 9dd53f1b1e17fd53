// The coordinator's durable state, in one directory:
//   blobs/<sha256>      content-addressed blobs (safetensors), written atomically, never modified
//   ledger.json         the run and its versions (version t = the state after round t), rewritten
//   atomically metrics.jsonl       one JSON object per closed round (the whole file is rewritten
//   atomically each round)
// A restart on the same directory continues from the last version in the ledger.
#ifndef FEDLORA_SERVER_STATE_STORE_H_
#define FEDLORA_SERVER_STATE_STORE_H_

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/file_util.h"

namespace fedlora::server {

struct BlobInfo {
  std::string sha256;
  int64_t size = 0;
  std::string kind;  // "adapter" | "delta" | "frozen" | "r"
  int64_t version = 0;
};

struct Version {
  int64_t version = 0;  // = the round that produced it; 0 is the initial state
  std::vector<BlobInfo> blobs;
};

struct Ledger {
  std::string run_id;
  std::string method;
  std::string base_model_sha256;                     // pinned at the first join when not configured
  nlohmann::json modules = nlohmann::json::array();  // [{name, in_features, out_features}]
  std::vector<Version> versions;
  // Client-level DP: {"clip": C for the next round, "rounds": [{"q", "sigma", "steps"} per closed
  // round]} (common::SpentOver's history); empty without it.
  nlohmann::json client_dp = nlohmann::json::object();
};

class StateStore {
 public:
  // Opens (creating if needed) the directory; loads the ledger if there is one.
  static absl::StatusOr<StateStore> Open(const std::filesystem::path& dir);

  bool has_ledger() const { return has_ledger_; }
  const Ledger& ledger() const { return ledger_; }

  // Stores `bytes` as a blob (no-op if it exists) and returns its sha256.
  absl::StatusOr<std::string> PutBlob(std::string_view bytes);
  // Up to `max_bytes` of blob `sha256` from `offset`, and its total size.
  absl::StatusOr<std::pair<std::string, int64_t>> ReadBlob(const std::string& sha256,
                                                           int64_t offset, int64_t max_bytes) const;
  absl::StatusOr<std::string> ReadWholeBlob(const std::string& sha256) const;

  // Replaces the ledger on disk atomically, then in memory.
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

  // Adds one line to metrics.jsonl (rewritten atomically, so a crash never leaves half a line).
  absl::Status AppendMetrics(const nlohmann::json& line);
  const std::vector<std::string>& metrics_lines() const { return metrics_; }

  const std::filesystem::path& dir() const { return dir_; }

 private:
  std::filesystem::path dir_;
  bool has_ledger_ = false;
  Ledger ledger_;
  std::vector<std::string> metrics_;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_STATE_STORE_H_
