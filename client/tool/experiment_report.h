// The results of `fedlora experiment`: the tidy CSV, the Markdown report (mean ± sample standard
// deviation over seeds) and the plots, drawn by gnuplot from Debian's archive.
#ifndef FEDLORA_CLIENT_TOOL_EXPERIMENT_REPORT_H_
#define FEDLORA_CLIENT_TOOL_EXPERIMENT_REPORT_H_

#include <filesystem>
#include <vector>

#include "absl/status/status.h"
#include "client/tool/experiment_harvest.h"
#include "client/tool/experiment_spec.h"

namespace fedlora::tool {

// Writes results.csv, results_by_task.csv (when the held-out records name tasks), report.md and
// (with gnuplot) loss.svg, accuracy.svg and accuracy_vs_bytes.svg into `out`, each atomically.
absl::Status WriteExperimentReport(const ExperimentSpec& spec, const std::vector<ResultRow>& rows,
                                   const std::filesystem::path& out);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPERIMENT_REPORT_H_
