// What a node trains: the interface between the node (join, catch up, upload) and a site's
// training. Built in: `regression` (regression_workload.h), `command` (command_workload.h, an
// external program) and `llm` (llm_workload.h, the built-in trainer).
#ifndef FEDLORA_CLIENT_WORKLOADS_WORKLOAD_H_
#define FEDLORA_CLIENT_WORKLOADS_WORKLOAD_H_

#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/sketch.h"
#include "common/tensor/adapter.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::client {

class Workload {
 public:
  virtual ~Workload() = default;
  virtual std::string fingerprint() const = 0;  // sha256 (hex) of the base model's weights
  virtual int64_t num_examples() const = 0;
  virtual std::vector<v1::ModuleSpec> modules() const = 0;  // the adaptable linear layers
  // Trains `adapter` (the node has set its starting value and scaling) for `task`, in place;
  // returns the loss of the starting state and after training on the site's data.
  virtual absl::StatusOr<v1::TrainMetrics> Train(const v1::Task& task,
                                                 common::Adapter& adapter) = 0;
  // Fed-SB's initialisation (v1::SketchTask): per module of the task, the product `step` asks
  // for of G, the gradient of the mean loss over the site's first `examples` records with respect
  // to the module's frozen weight, with bases[i] (common/aggregation/sketch.h). UNIMPLEMENTED
  // where the workload cannot take that gradient (the node then leaves the run, saying why).
  virtual absl::StatusOr<std::vector<common::MatrixD>> Sketch(
      const v1::Task& task, common::SketchStep step, const std::vector<common::MatrixD>& bases) {
    (void)task, (void)step, (void)bases;
    return absl::UnimplementedError(
        "this workload cannot compute the gradient fed-sb's initialisation needs; run the "
        "coordinator with fed_sb_init = random");
  }
  // FLoRA: merges one round's delta (scaling folded) into the base, in round order.
  virtual absl::Status MergeIntoBase(const common::Adapter& delta) = 0;
  // Writes what the site keeps when the run is done (e.g. the base with the merged deltas) into
  // `dir`.
  virtual absl::Status WriteFinalState(const std::filesystem::path& dir) const = 0;
};

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_WORKLOADS_WORKLOAD_H_
