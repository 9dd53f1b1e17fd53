// The coordinator's ledger: the run and its versions, typed. Version t is the state after round t
// (0 is the initial state); each names the blobs it holds (content-addressed by sha256) and, from
// round 1 on, the round's record (common/run/records.h), so that everything derived from a
// committed round (the held-out evaluation, the metrics line, exports) can be rebuilt from the
// ledger alone, after a failure or a restart, without aggregating again.
//
// On disk it is ledger.json, format "fedlora-ledger-1" (server/state_store.h writes it; the
// offline tool reads it with ReadLedger).
#ifndef FEDLORA_COMMON_RUN_LEDGER_H_
#define FEDLORA_COMMON_RUN_LEDGER_H_

#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "common/privacy/privacy_accountant.h"
#include "common/run/records.h"

namespace fedlora::common {

// What a blob holds: the whole global adapter (fedit, lora-fair), a round's stacked delta (flora),
// Fed-SB's frozen B and A with R0 (version 0), its averaged R, or the basis a step of Fed-SB's
// initialisation left for the next.
enum class BlobKind { kAdapter, kDelta, kFrozen, kR, kBasis };
std::string_view BlobKindName(BlobKind kind);  // "adapter", "delta", "frozen", "r", "basis"
absl::StatusOr<BlobKind> ParseBlobKind(std::string_view name);
// The kind of the one blob a version holds: version 0 is the initial adapter (Fed-SB: the frozen
// factors; FLoRA's has no blob, its clients start from the base model), a round's version the new
// adapter, FLoRA's delta or Fed-SB's R.
std::optional<BlobKind> VersionBlobKind(Method method, int64_t version);

struct BlobRef {
  std::string sha256;
  int64_t size = 0;
  BlobKind kind = BlobKind::kAdapter;
  int64_t version = 0;

  nlohmann::json ToJson() const;
  static absl::StatusOr<BlobRef> FromJson(JsonReader& in);
};

// A module of the run: the adapted linear layer's name and its n (in) and m (out).
struct ModuleSpec {
  std::string name;
  int in_features = 0;
  int out_features = 0;

  nlohmann::json ToJson() const;
  static absl::StatusOr<ModuleSpec> FromJson(JsonReader& in);
};

struct Version {
  int64_t version = 0;  // = the round that produced it
  std::vector<BlobRef> blobs;
  std::optional<RoundRecord> record;          // from round 1 on
  std::optional<InitStepRecord> init_record;  // version 0 of a run initialised from gradients

  nlohmann::json ToJson() const;
  static absl::StatusOr<Version> FromJson(JsonReader& in);
};

// Fed-SB's initialisation (server/fed_sb_init.h), before version 0: its settings and the steps
// committed so far, each with the basis it left for the next step and its record. Version 0 is
// written when the last step commits.
struct FedSbInit {
  enum class Mode { kSketch, kDense };
  Mode mode = Mode::kSketch;
  int columns = 0;  // r + oversampling
  int power_iterations = 0;
  int examples = 0;
  double lr = 0;
  uint64_t seed = 0;  // of the test matrices
  struct Step {
    BlobRef basis;  // kBasis, version -1
    InitStepRecord record;

    nlohmann::json ToJson() const;
    static absl::StatusOr<Step> FromJson(JsonReader& in);
  };
  std::vector<Step> steps;
  int total_steps() const;  // 1 (dense) or 2 + 2·power_iterations

  nlohmann::json ToJson() const;
  static absl::StatusOr<FedSbInit> FromJson(JsonReader& in);
};

// Client-level DP: the clip for the next round and what every closed round spent.
struct ClientDpState {
  double clip = 0;
  PrivacyHistory rounds;

  nlohmann::json ToJson() const;
  static absl::StatusOr<ClientDpState> FromJson(JsonReader& in);
};

struct Ledger {
  std::string run_id;
  Method method = Method::kFedIt;
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
  std::vector<ModuleShape> Shapes(int rank, bool has_r) const;

  nlohmann::json ToJson() const;
  // DATA_LOSS naming the file, the field and what is wrong when the document is not a well-formed
  // ledger: a missing or mistyped key, versions out of order or missing, an unknown method, a
  // version without its one blob of the method's kind.
  static absl::StatusOr<Ledger> FromJson(JsonReader& in);
};

// Reads and checks ledger.json.
absl::StatusOr<Ledger> ReadLedger(const std::filesystem::path& file);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_RUN_LEDGER_H_
