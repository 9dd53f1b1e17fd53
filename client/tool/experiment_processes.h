// The processes of `fedlora experiment`: the tool's own steps run to their end (make-data,
// init-model, gnuplot), and each cell's federation — a coordinator and its clients as real
// processes (common/base/subprocess.h) — supervised to the end of the run.
#ifndef FEDLORA_CLIENT_TOOL_EXPERIMENT_PROCESSES_H_
#define FEDLORA_CLIENT_TOOL_EXPERIMENT_PROCESSES_H_

#include <atomic>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace fedlora::tool {

// Runs a program (found on PATH unless the name has a slash) to its end, in `cwd` when given,
// stdout and stderr into `log`; an exit other than 0 is an error quoting the log's end.
absl::Status RunToEnd(const std::vector<std::string>& argv, const std::filesystem::path& log,
                      const std::filesystem::path& cwd = {});

// A federation's processes: the coordinator, which writes the port it listens on into
// `port_file`, then `clients` clients once it does.
struct FederationPlan {
  std::vector<std::string> coordinator;  // argv
  std::filesystem::path port_file;
  int clients = 0;
  // The argv of client k (1-based), given the port the coordinator listens on.
  std::function<std::vector<std::string>(int k, const std::string& port)> client;
  std::filesystem::path dir;  // the logs go here: server.log, client-<k>.log
  std::string label;          // names the federation in errors
};

// Runs the plan until every process has exited 0, calling `progress` about every 200 ms
// meanwhile. A process that fails, a coordinator that does not listen within 30 s, or `stop`
// becoming true (a signal to this program) ends the others (SIGTERM, then SIGKILL after 10 s) and
// is an error; a failure's error quotes the end of the failed process's log.
absl::Status RunFederation(const FederationPlan& plan, const std::function<void()>& progress,
                           const std::atomic<bool>& stop);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPERIMENT_PROCESSES_H_
