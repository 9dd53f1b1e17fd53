#include "client/tool/experiment_processes.h"

#include <signal.h>

#include <cctype>
#include <chrono>
#include <thread>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/base/subprocess.h"

namespace fedlora::tool {

using common::StrCat;
using common::Subprocess;
namespace fs = std::filesystem;

namespace {

std::string Tail(const fs::path& log) {
  const std::string text = common::ReadFileToString(log).value_or("");
  return text.size() > 1500 ? "…" + text.substr(text.size() - 1500) : text;
}

// SIGTERM to every child still running, then SIGKILL to those still running 10 s later (one
// grace period for all, not one each).
void StopAll(std::vector<Subprocess>& children) {
  for (Subprocess& child : children) child.Signal(SIGTERM);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  for (Subprocess& child : children) {
    child.Stop(std::max(deadline - std::chrono::steady_clock::now(),
                        std::chrono::steady_clock::duration::zero()));
  }
}

absl::Status Stopped(const std::string& label) {
  return absl::CancelledError(
      StrCat(label, ": stopped by a signal; the cell's coordinator and clients were stopped too"));
}

// Waits for the coordinator to write its port (30 s at most); an exit before is an error.
absl::StatusOr<std::string> WaitForPort(Subprocess& coordinator, const FederationPlan& plan,
                                        const fs::path& log, const std::atomic<bool>& stop) {
  for (int i = 0; i < 600; ++i) {
    std::string port = common::ReadFileToString(plan.port_file).value_or("");
    while (!port.empty() && std::isspace(static_cast<unsigned char>(port.back()))) port.pop_back();
    if (!port.empty()) return port;
    if (coordinator.Poll())
      return absl::InternalError(
          StrCat(plan.label, ": the coordinator exited (", log.string(), "):\n", Tail(log)));
    if (stop) return Stopped(plan.label);
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return absl::InternalError(StrCat(plan.label, ": the coordinator did not listen within 30 s"));
}

}  // namespace

absl::Status RunToEnd(const std::vector<std::string>& argv, const fs::path& log,
                      const fs::path& cwd) {
  ASSIGN_OR_RETURN(const common::ExitStatus exit,
                   common::RunSubprocess(argv, {.stdout_file = log, .working_dir = cwd}));
  if (exit.ok()) return absl::OkStatus();
  return absl::InternalError(
      StrCat(fs::path(argv[0]).filename().string(), " failed (", log.string(), "):\n", Tail(log)));
}

absl::Status RunFederation(const FederationPlan& plan, const std::function<void()>& progress,
                           const std::atomic<bool>& stop) {
  if (stop) return Stopped(plan.label);
  std::vector<Subprocess> children;  // a child left running on an early return is killed
  std::vector<fs::path> logs = {plan.dir / "server.log"};
  ASSIGN_OR_RETURN(Subprocess coordinator,
                   Subprocess::Start(plan.coordinator, {.stdout_file = logs[0]}));
  children.push_back(std::move(coordinator));
  absl::StatusOr<std::string> port = WaitForPort(children[0], plan, logs[0], stop);
  if (!port.ok()) {
    StopAll(children);
    return port.status();
  }
  for (int k = 1; k <= plan.clients; ++k) {
    logs.push_back(plan.dir / StrCat("client-", k, ".log"));
    absl::StatusOr<Subprocess> client =
        Subprocess::Start(plan.client(k, *port), {.stdout_file = logs.back()});
    if (!client.ok()) {
      StopAll(children);
      return client.status();
    }
    children.push_back(std::move(*client));
  }
  // Wait for every process, showing progress.
  std::vector<bool> done(children.size(), false);
  while (!std::all_of(done.begin(), done.end(), [](bool d) { return d; })) {
    if (stop) {
      StopAll(children);
      return Stopped(plan.label);
    }
    for (size_t i = 0; i < children.size(); ++i) {
      if (done[i]) continue;
      const std::optional<common::ExitStatus> exit = children[i].Poll();
      if (!exit) continue;
      done[i] = true;
      if (!exit->ok()) {
        StopAll(children);
        return absl::InternalError(StrCat(plan.label, ": ", logs[i].filename().string(),
                                          " failed (", logs[i].string(), "):\n", Tail(logs[i])));
      }
    }
    progress();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  return absl::OkStatus();
}

}  // namespace fedlora::tool
