// fedlora make-data: a synthetic instruction dataset (common/llm/synthetic_data.h's six task
// categories) for `clients` clients, non-IID by per-client label proportions ~ Dirichlet(α)
// (common/base/partition.h), and a held-out set balanced over the categories.
#ifndef FEDLORA_CLIENT_TOOL_MAKE_DATA_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_MAKE_DATA_COMMAND_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

struct MakeDataCommandOptions {
  std::string out;  // directory to write: client-<k>.jsonl, test.jsonl (required)
  int clients = 4;
  int records = 200;       // per client
  int test_records = 120;  // held out, category i % 6 for record i
  double alpha = 0.5;      // Dirichlet concentration of each client's category mix
  uint64_t seed = 0;
  bool overwrite = false;  // replace `out` if it exists
};

// Writes the directory atomically and prints each client's records per category.
absl::Status Run(const MakeDataCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_MAKE_DATA_COMMAND_H_
