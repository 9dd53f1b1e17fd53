// `fedlora experiment SPEC`: a grid of real federations (a coordinator and N client processes on
// loopback over mutual TLS) and their baselines, from a TOML spec (experiment_spec.h) to a tidy
// CSV, a Markdown report and plots (experiment_report.h). Every federation is real: fedlora-server
// and one fedlora-client per site, started from this program's directory, over mutual TLS on
// loopback with certificates made here (common/net/certs.h). The base model and the data split are
// made by this program's own `init-model` and by experiment_partition.h. Each finished cell leaves
// cells/<id>/result.json (atomically), so a run that is stopped resumes where it was: finished
// cells are not run again, an unfinished one starts over.
#ifndef FEDLORA_CLIENT_TOOL_EXPERIMENT_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_EXPERIMENT_COMMAND_H_

#include <string>

#include "absl/status/status.h"

namespace fedlora::tool {

struct ExperimentCommandOptions {
  std::string spec;          // the TOML spec (required)
  std::string out;           // results directory; empty: the spec's out
  std::string data_dir;      // the directory of [data]'s train and test files, over the spec's
  std::string model_dir;     // a Hugging Face model directory instead of [model]'s
  bool report_only = false;  // rebuild the CSV, report and plots from the finished cells only
};

// Runs the cells not finished yet, then writes the report from every finished cell. Progress and
// the ETA go to stderr. SIGINT or SIGTERM stops the running cell's processes and ends the run with
// an error; the finished cells stay.
absl::Status Run(const ExperimentCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPERIMENT_COMMAND_H_
