// The data of `fedlora experiment`: the records of the spec's files (or of a synthetic pool made
// by `fedlora make-data`), the held-out file every cell is evaluated on, and the partition of the
// training pool into clients' files — per file, or "dirichlet": per-label client shares ~
// Dirichlet(α) (Hsu et al. 2019; common/base/partition.h) over the spec's label_field.
#ifndef FEDLORA_CLIENT_TOOL_EXPERIMENT_PARTITION_H_
#define FEDLORA_CLIENT_TOOL_EXPERIMENT_PARTITION_H_

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/tool/experiment_spec.h"

namespace fedlora::tool {

struct Record {
  std::string line;   // the JSON object, as read
  std::string label;  // the partition's label
};

// The records as JSONL, one a line.
std::string Lines(const std::vector<Record>& records);

struct ExperimentData {
  std::vector<std::vector<Record>> train;  // per train file (one pool when synthetic)
  std::filesystem::path test;              // the held-out records: <out>/data/test.jsonl
};

// Reads the spec's data into <out>/data/, making the synthetic pool first with `fedlora` (the
// program in `bin`) when the spec asks for one, and writes the held-out file. Held-out records of
// files get a "task" (the file's name) unless they have a task or category.
absl::StatusOr<ExperimentData> PrepareData(const ExperimentSpec& spec,
                                           const std::filesystem::path& bin);

// A split's files: one per client, and all of them pooled (the centralised baseline's).
struct Split {
  std::vector<std::filesystem::path> clients;
  std::filesystem::path pooled;
};

// The split of `data` over `clients` clients for a seed and alpha, written under <out>/data/ the
// first time (pooled.jsonl last: its presence says the split is complete). Every client holds at
// least one batch of records.
absl::StatusOr<Split> SplitFor(const ExperimentSpec& spec, const ExperimentData& data,
                               uint64_t seed, int clients, double alpha);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPERIMENT_PARTITION_H_
