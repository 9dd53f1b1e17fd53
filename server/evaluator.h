// The base model on the coordinator (with --base-model-dir): the held-out loss of the global model
// after each round (with --eval-data), and the weights the merged export writes. For FLoRA it keeps
// the base with every round's delta merged, as the clients hold it, one version at a time. Used by
// the follow-up's thread only (server/follow_up.h), from ledger snapshots; tests may stand in a
// subclass.
#ifndef FEDLORA_SERVER_EVALUATOR_H_
#define FEDLORA_SERVER_EVALUATOR_H_

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "absl/status/statusor.h"
#include "common/llm/accuracy.h"
#include "common/llm/dataset.h"
#include "common/llm/trainer.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

class Evaluator {
 public:
  // Loads the base model of options.base_model_dir and the held-out records of eval_data, and
  // checks the model against options.base_model_sha256 when that is set.
  static absl::StatusOr<std::unique_ptr<Evaluator>> Load(const ServerOptions& options);

  virtual ~Evaluator() = default;
  const std::string& fingerprint() const { return fingerprint_; }

  // FLoRA: merges the deltas of the versions after the merged one, up to `version` (a no-op for
  // other methods and when already there).
  absl::Status MergeFloraUpTo(const Ledger& ledger, const StateStore& store, int64_t version);

  struct Scores {
    double loss = 0;                 // token-weighted mean over the held-out records
    std::optional<double> accuracy;  // with eval_accuracy
    std::map<std::string, double> accuracy_by_task;  // when the records name tasks
  };
  // The held-out scores of the global model of `version`: the base with `global` (its latest
  // adapter; ignored for FLoRA, whose deltas are merged up to `version` first). nullopt without
  // held-out records, or when FLoRA's merged weights are past `version` (an older version cannot
  // be evaluated again).
  virtual absl::StatusOr<std::optional<Scores>> Evaluate(const Ledger& ledger,
                                                         const StateStore& store, int64_t version,
                                                         const common::Adapter& global);

  // The base with `global` merged (FLoRA: the merged base up to `version`).
  virtual absl::StatusOr<common::LlamaWeights> Merged(const Ledger& ledger, const StateStore& store,
                                                      int64_t version,
                                                      const common::Adapter& global);

 protected:
  Evaluator() = default;

 private:
  bool flora_ = false;
  std::string fingerprint_;
  std::unique_ptr<common::Model> base_;
  std::vector<common::Example> eval_examples_;
  std::vector<common::AnswerRecord> answer_records_;  // with eval_accuracy
  int max_new_tokens_ = 0;
  std::optional<common::LlamaWeights> flora_merged_;  // FLoRA: base + Σ deltas of 1..flora_version_
  int64_t flora_version_ = 0;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_EVALUATOR_H_
