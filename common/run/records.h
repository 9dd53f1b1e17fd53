// The typed records of a coordinator run, as the coordinator writes them (server/) and the offline
// tool reads them (`fedlora summary`, the experiment runner): a closed round's record, a step of
// Fed-SB's initialisation, and a metrics.jsonl line (the round's record with its held-out scores).
// Each converts to JSON (the keys of metrics.jsonl, documented in README.md) and back; a malformed
// record is a DATA_LOSS naming the file, line and field (common/run/json_reader.h), never an
// exception.
#ifndef FEDLORA_COMMON_RUN_RECORDS_H_
#define FEDLORA_COMMON_RUN_RECORDS_H_

#include <cstdint>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "common/run/json_reader.h"

namespace fedlora::common {

using PerClient = std::map<std::string, int64_t>;      // client → a count (bytes, examples)
using PerClientValue = std::map<std::string, double>;  // client → a figure (ε, norm, share)

// What one private release (a round, or a step of Fed-SB's initialisation) spent under
// client-level DP, and with what.
struct ClientDpSpend {
  std::optional<double> epsilon;  // at `delta`, over the run so far; none: infinite (no noise)
  double delta = 0;
  double order = 0;  // the Rényi order that gave epsilon
  double sample_rate = 0;
  double expected_clients = 0;
  double noise_multiplier = 0;
  double clip = 0;
  std::optional<double> update_noise_multiplier;  // rounds: after adaptive clipping's share
  std::optional<double> next_clip;                // rounds: the clip of the next round

  nlohmann::json ToJson() const;
  static absl::StatusOr<ClientDpSpend> FromJson(JsonReader& in);
  bool operator==(const ClientDpSpend&) const = default;
};

// A round or step under secure aggregation: its instance's parameters
// (server/round/secure_round.h).
struct SecAggRecord {
  int clients = 0;                     // the cohort
  int neighbours = 0;                  // each client's (clients − 1: the complete graph)
  int threshold = 0;                   // shares that unmask a client
  int bits = 0;                        // per value of a masked input
  int64_t values = 0;                  // each client's, before rotation
  double clip = 0;                     // each client's change was clipped to this
  double scale = 0;                    // a value v was sent as round(v·scale)
  std::optional<double> noise_stddev;  // each client's noise (distributed DP), in value units
  std::optional<int> summed;           // lora-fair's correction: the clients in its sum

  nlohmann::json ToJson() const;
  static absl::StatusOr<SecAggRecord> FromJson(JsonReader& in);
  bool operator==(const SecAggRecord&) const = default;
};

// Who took part in a round or step, and what moved.
struct Participation {
  int attempt = 1;  // 1 for the first
  std::vector<std::string> cohort;
  std::vector<std::string> arrived;  // accepted, sorted
  // client → how many of its updates were refused (at the door, or 1 for one left out at the
  // close): a client that sends 3,000 bad files is listed once, with 3000.
  PerClient rejected;
  std::map<std::string, std::string> declined;  // client → its reason
  // client → why the coordinator removed it from the run (--max-rejections), since the last record
  std::map<std::string, std::string> removed;
  PerClient bytes_up;          // the accepted uploads' sizes
  PerClient bytes_down;        // every cohort member's downloads this round
  double elapsed_seconds = 0;  // since the first round of this coordinator process started

  // Its keys sit in the record's own object.
  void AddTo(nlohmann::json& record) const;
  static absl::StatusOr<Participation> FromJson(JsonReader& in);
  bool operator==(const Participation&) const = default;
};

// One committed step of Fed-SB's initialisation (server/fed_sb_init.h). The last step's record
// sits on version 0 with the whole initialisation's traffic.
struct InitStepRecord {
  int step = 0;  // 1-based
  int steps = 0;
  std::string product;  // common::SketchStepName of the step
  Participation who;
  std::optional<ClientDpSpend> client_dp;
  PerClient init_bytes_up, init_bytes_down;  // the last step: every step's, added up

  nlohmann::json ToJson() const;
  static absl::StatusOr<InitStepRecord> FromJson(JsonReader& in);
  bool operator==(const InitStepRecord&) const = default;
};

// A closed round, as its commit computed it: the ledger keeps it on the round's version, and
// metrics.jsonl repeats it with the held-out scores.
struct RoundRecord {
  int64_t round = 0;  // = the version it made
  Method method = Method::kFedIt;
  Participation who;
  std::vector<std::string> dropped;     // cohort members that neither answered nor declined
  std::map<std::string, int64_t> late;  // client → the round its late update was for
  double mean_loss_before = 0;          // weighted by the aggregation weights
  double mean_train_loss = 0;
  double aggregation_seconds = 0;
  std::map<std::string, std::string> updates;  // client → its update's sha256
  PerClient examples;                          // client → its aggregation weight
  PerClientValue weight_share;                 // client → its share of the aggregate
  std::string global_blob;                     // the version's blob (sha256)
  int64_t blob_bytes = 0;
  std::optional<ClientDpSpend> client_dp;
  PerClientValue update_norms;  // client → its accepted update's ‖s·B·A‖_F (not DP, not sketches)
  PerClientValue norm_outliers;  // client → its norm, left out by --max-update-norm-ratio
  PerClientValue dp_epsilon;     // DP-SGD clients: ε they report spent
  std::optional<double> lora_fair_objective, fedit_objective;  // lora-fair
  std::optional<SecAggRecord> secure_aggregation;
  std::optional<SecAggRecord> secure_correction;  // lora-fair's second sum (over the first's)

  nlohmann::json ToJson() const;
  static absl::StatusOr<RoundRecord> FromJson(JsonReader& in);
  bool operator==(const RoundRecord&) const = default;
};

// A line of metrics.jsonl: a round's record and the global model's held-out scores.
struct MetricsLine {
  RoundRecord record;
  std::optional<double> eval_loss;
  std::optional<double> eval_accuracy;
  PerClientValue eval_accuracy_by_task;  // task → accuracy

  nlohmann::json ToJson() const;
  static absl::StatusOr<MetricsLine> FromJson(JsonReader& in);
  bool operator==(const MetricsLine&) const = default;
};

// metrics.jsonl's lines, in order; a line that is not a metrics line is an error naming it.
absl::StatusOr<std::vector<MetricsLine>> ReadMetrics(const std::filesystem::path& file);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_RUN_RECORDS_H_
