// Running other programs: posix_spawn with an argv, never a shell string, so an argument (a path
// with a space or a quote in it) reaches the program exactly as given. A caller that wants a shell
// (a user's --train-command) runs {"/bin/sh", "-c", command} and passes its data in the
// environment, never spliced into the command. Used by the command workload, `fedlora experiment`
// and the end-to-end tests.
#ifndef FEDLORA_COMMON_BASE_SUBPROCESS_H_
#define FEDLORA_COMMON_BASE_SUBPROCESS_H_

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::common {

struct SubprocessOptions {
  // The child's stdout: this file (created with mode 0644), or this process's stdout when empty.
  std::filesystem::path stdout_file;
  // The child's stderr: this file; when empty, the stdout file when one is given (both in one
  // log), else this process's stderr.
  std::filesystem::path stderr_file;
  // Append to the files instead of truncating them (default: truncate).
  bool append = false;
  // The child's working directory (default: this process's). A relative argv[0] with a slash is
  // then relative to it.
  std::filesystem::path working_dir;
  // Variables set in the child's environment, over this process's (default: none added).
  std::map<std::string, std::string> environment;
};

// How a child ended: it exited with `code`, or a signal ended it.
struct ExitStatus {
  int code = 0;    // the exit code, when signal is 0 (-1: reaped by someone else, unknown)
  int signal = 0;  // the signal that ended the child, or 0 when it exited

  bool ok() const { return signal == 0 && code == 0; }
  // "exit code 3", or "signal 9 (Killed)".
  std::string ToString() const;
  // The shell's convention: the exit code, or 128 + the signal.
  int ShellCode() const { return signal ? 128 + signal : code; }
};

// A child process, found on PATH unless argv[0] has a slash. Its signal mask is empty and every
// signal has its default action (a parent that ignores SIGPIPE, as gRPC does, does not pass that
// on); stdin is this process's. Movable, not copyable. The destructor of a Subprocess whose child
// still runs kills it (SIGKILL) and reaps it, so no child outlives an error path; Release() hands
// the pid over instead.
class Subprocess {
 public:
  // Starts argv[0] with arguments argv. Errors: an empty argv, an unwritable output file, or a
  // program that cannot be run (not found, not executable), each naming it.
  static absl::StatusOr<Subprocess> Start(const std::vector<std::string>& argv,
                                          const SubprocessOptions& options = {});

  Subprocess(Subprocess&& other) noexcept;
  Subprocess& operator=(Subprocess&& other) noexcept;
  Subprocess(const Subprocess&) = delete;
  Subprocess& operator=(const Subprocess&) = delete;
  ~Subprocess();

  pid_t pid() const { return pid_; }
  // The exit, once the child has ended (it is reaped then); nullopt while it runs. Never blocks.
  std::optional<ExitStatus> Poll();
  // Waits for the child to end.
  ExitStatus Wait();
  // Waits at most `timeout`; nullopt when the child still runs then (it is left running).
  std::optional<ExitStatus> WaitFor(std::chrono::duration<double> timeout);
  // Sends `sig` to a child that has not been reaped yet.
  void Signal(int sig);
  // SIGTERM, then SIGKILL if the child still runs after `grace`; returns how it ended.
  ExitStatus Stop(std::chrono::duration<double> grace = std::chrono::seconds(10));
  // Gives up the child without waiting for it: the caller reaps `pid` (WaitForExit).
  pid_t Release();

 private:
  explicit Subprocess(pid_t pid) : pid_(pid) {}
  void KillAndReap();
  pid_t pid_ = -1;                  // -1 once reaped or released
  std::optional<ExitStatus> exit_;  // set when reaped
};

// Waits at most `timeout` for child `pid` of this process (one a Subprocess released) and reaps
// it; nullopt when it still runs then.
std::optional<ExitStatus> WaitForExit(pid_t pid, std::chrono::duration<double> timeout);

// Runs argv to its end: how it ended. With a timeout, a child still running after it is killed
// (SIGKILL; a grandchild it started is not) and the error is DeadlineExceeded naming the program.
absl::StatusOr<ExitStatus> RunSubprocess(
    const std::vector<std::string>& argv, const SubprocessOptions& options = {},
    std::optional<std::chrono::duration<double>> timeout = std::nullopt);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_SUBPROCESS_H_
