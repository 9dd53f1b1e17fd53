// Starting and reaping real processes in end-to-end tests, through common/base/subprocess.h: an
// argv, never a shell string, so a path with a space or a quote reaches the program as it is.
#ifndef FEDLORA_TESTS_PROCESS_H_
#define FEDLORA_TESTS_PROCESS_H_

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/base/strings.h"
#include "common/base/subprocess.h"

namespace fedlora::testing {

using Args = std::vector<std::string>;

inline void AppendArgs(Args& out, const std::string& arg) { out.push_back(arg); }
inline void AppendArgs(Args& out, const char* arg) { out.emplace_back(arg); }
inline void AppendArgs(Args& out, const Args& args) {
  out.insert(out.end(), args.begin(), args.end());
}

// One argv from arguments and lists of arguments, in order:
// Argv("aggregate", "--out", dir, inputs) with inputs an Args.
template <typename... Parts>
Args Argv(const Parts&... parts) {
  Args out;
  (AppendArgs(out, parts), ...);
  return out;
}

// The arguments joined by spaces, for a test's messages (not for a shell).
inline std::string CommandLine(const Args& args) { return common::StrJoin(args, " "); }

// Starts argv[0] with stdout and stderr appended to `log` (stderr to `err` instead, when given);
// returns its pid (or -1). The caller reaps it (Wait).
inline pid_t Start(const Args& argv, const std::filesystem::path& log,
                   const std::filesystem::path& err = {}) {
  absl::StatusOr<common::Subprocess> child =
      common::Subprocess::Start(argv, {.stdout_file = log, .stderr_file = err, .append = true});
  return child.ok() ? child->Release() : -1;
}

// Waits up to `timeout` for `pid`; returns its exit code, 128+signal if killed, or -1 on time-out
// (then kills it).
inline int Wait(pid_t pid, std::chrono::duration<double> timeout) {
  if (std::optional<common::ExitStatus> exit = common::WaitForExit(pid, timeout))
    return exit->ShellCode();
  kill(pid, SIGKILL);
  common::WaitForExit(pid, std::chrono::seconds(60));
  return -1;
}

inline std::string ReadText(const std::filesystem::path& path) {
  std::stringstream s;
  s << std::ifstream(path).rdbuf();
  return s.str();
}

// A program's exit code (-1 when it could not start or a signal ended it) and its stdout and
// stderr together.
struct CommandResult {
  int exit_code;
  std::string output;
};
inline CommandResult RunProgram(const Args& argv) {
  std::string name = (std::filesystem::temp_directory_path() / "fedlora-output-XXXXXX").string();
  const int fd = mkstemp(name.data());
  if (fd >= 0) close(fd);
  absl::StatusOr<common::ExitStatus> exit = common::RunSubprocess(argv, {.stdout_file = name});
  CommandResult r{-1, ReadText(name)};
  std::filesystem::remove(name);
  if (!exit.ok()) r.output += std::string(exit.status().message());
  if (exit.ok() && exit->signal == 0) r.exit_code = exit->code;
  return r;
}

// Waits for a file to appear with content (e.g. a --port-file); returns its text, or "" after the
// timeout.
inline std::string WaitForFile(const std::filesystem::path& path,
                               std::chrono::duration<double> timeout) {
  const auto end = std::chrono::steady_clock::now() + timeout;
  while (std::chrono::steady_clock::now() < end) {
    std::string text = ReadText(path);
    if (!text.empty()) return text;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return "";
}

}  // namespace fedlora::testing

#endif  // FEDLORA_TESTS_PROCESS_H_
