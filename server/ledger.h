// The coordinator's ledger: the run and its versions, typed. Version t is the state after round t
// (0 is the initial state); each names the blobs it holds (content-addressed by sha256) and, from
// round 1 on, the round's record — the metrics line as the round's close computed it — so that
// everything derived from a committed round (the held-out evaluation, the metrics line, exports)
// can be rebuilt from the ledger alone, after a failure or a restart, without aggregating again.
//
// On disk it is ledger.json, format "fedlora-ledger-1" (see StateStore).
#ifndef FEDLORA_SERVER_LEDGER_H_
#define FEDLORA_SERVER_LEDGER_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "common/privacy/privacy_accountant.h"

namespace fedlora::server {

// What a blob holds: the whole global adapter (fedit, lora-fair), a round's stacked delta (flora),
// Fed-SB's frozen B and A with R0 (version 0), its averaged R, or the basis a step of Fed-SB's
// initialisation left for the next.
enum class BlobKind { kAdapter, kDelta, kFrozen, kR, kBasis };
std::string_view BlobKindName(BlobKind kind);  // "adapter", "delta", "frozen", "r", "basis"

struct BlobRef {
  std::string sha256;
  int64_t size = 0;
  BlobKind kind = BlobKind::kAdapter;
  int64_t version = 0;
};

// A module of the run: the adapted linear layer's name and its n (in) and m (out).
struct ModuleSpec {
  std::string name;
  int in_features = 0;
  int out_features = 0;
};

struct Version {
  int64_t version = 0;  // = the round that produced it
  std::vector<BlobRef> blobs;
  nlohmann::json record;  // the round's metrics line without what is derived later; null for 0
};

// Fed-SB's initialisation (server_options.h, fed_sb_init), before version 0: its settings and the
// steps committed so far, each with the basis it left for the next step (sketch) and its record
// (who contributed, bytes). Version 0 is written when the last step commits.
struct FedSbInit {
  std::string mode;  // "sketch" or "dense"
  int columns = 0;   // r + oversampling
  int power_iterations = 0;
  int examples = 0;
  double lr = 0;
  uint64_t seed = 0;  // of the test matrices
  struct Step {
    BlobRef basis;  // kBasis, version -1
    nlohmann::json record;
  };
  std::vector<Step> steps;
  int total_steps() const;  // 1 (dense) or 2 + 2·power_iterations
};

// Client-level DP: the clip for the next round and what every closed round spent.
struct ClientDpState {
  double clip = 0;
  common::PrivacyHistory rounds;
};

struct Ledger {
  std::string run_id;
  common::Method method = common::Method::kFedIt;
  std::string base_model_sha256;  // pinned at the first join when not configured
  std::vector<ModuleSpec> modules;
  std::vector<Version> versions;
  std::optional<ClientDpState> client_dp;  // set in runs with client-level DP
  std::optional<FedSbInit> init;           // fed-sb runs initialised from the clients' data
  // Fed-SB's initialisation has not finished: no version yet.
  bool initialising() const { return init.has_value() && versions.empty(); }

  int64_t latest() const { return versions.empty() ? -1 : versions.back().version; }
  // The version numbered `v`; versions are 0, 1, 2, … in order, one per closed round.
  const Version& at(int64_t v) const { return versions.at(static_cast<size_t>(v)); }
  bool HoldsBlob(std::string_view sha256) const;
  // The run's modules as adapter shapes of rank r (scaling 1; LoRA-SB modules with `has_r`).
  std::vector<common::ModuleShape> Shapes(int rank, bool has_r) const;
};

nlohmann::json LedgerToJson(const Ledger& ledger);
// DATA_LOSS naming `origin` and what is wrong when `json` is not a well-formed ledger: a missing
// or mistyped key, versions out of order, an unknown method or blob kind.
absl::StatusOr<Ledger> LedgerFromJson(const nlohmann::json& json, std::string_view origin);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_LEDGER_H_
