// The results of `fedlora experiment`'s cells, harvested from what each cell's coordinator wrote
// (its ledger.json and metrics.jsonl, read through common/run's typed records): one row per round.
#ifndef FEDLORA_CLIENT_TOOL_EXPERIMENT_HARVEST_H_
#define FEDLORA_CLIENT_TOOL_EXPERIMENT_HARVEST_H_

#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/tool/experiment_spec.h"

namespace fedlora::tool {

// One CSV row: a cell after a round.
struct ResultRow {
  Cell cell;
  int round = 0;
  double eval_loss = 0;
  std::optional<double> eval_accuracy;
  std::map<std::string, double> accuracy_by_task;  // when the held-out records name tasks
  double bytes_up = 0, bytes_down = 0;             // this round, mean per client that took part
  double cumulative_bytes = 0;    // up + down per client since the start (Fed-SB's init too)
  std::optional<double> epsilon;  // client-level DP's ε, or the largest DP-SGD ε
  double round_seconds = 0, wall_seconds = 0;
};

// The rows of `cell`, whose coordinator's state directory is `dir`/state: one per round, each
// with its held-out loss; fewer or more than `rounds` is an error.
absl::StatusOr<std::vector<ResultRow>> HarvestCell(const Cell& cell,
                                                   const std::filesystem::path& dir, int rounds);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPERIMENT_HARVEST_H_
