#include "common/base/subprocess.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <thread>

#include "common/base/strings.h"

extern char** environ;

namespace fedlora::common {
namespace {

ExitStatus FromWaitStatus(int status) {
  if (WIFSIGNALED(status)) return {.code = 0, .signal = WTERMSIG(status)};
  return {.code = WEXITSTATUS(status), .signal = 0};
}

// waitpid, retried when a signal interrupts it. `options` 0 blocks; WNOHANG does not.
std::optional<ExitStatus> Reap(pid_t pid, int options) {
  int status = 0;
  pid_t got;
  do {
    got = ::waitpid(pid, &status, options);
  } while (got < 0 && errno == EINTR);
  // Not a child of ours (or reaped elsewhere): it is not running, and its exit is unknown (-1).
  if (got < 0) return ExitStatus{.code = -1, .signal = 0};
  if (got == 0) return std::nullopt;
  return FromWaitStatus(status);
}

std::optional<ExitStatus> ReapWithin(pid_t pid, std::chrono::duration<double> timeout) {
  using Clock = std::chrono::steady_clock;
  const Clock::time_point end = Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout);
  for (;;) {
    if (auto exit = Reap(pid, WNOHANG)) return exit;
    const Clock::time_point now = Clock::now();
    if (now >= end) return std::nullopt;
    std::this_thread::sleep_for(std::min<Clock::duration>(std::chrono::milliseconds(5), end - now));
  }
}

// This process's environment with `extra` set over it, as "NAME=value" strings.
std::vector<std::string> EnvironmentWith(const std::map<std::string, std::string>& extra) {
  std::vector<std::string> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    const std::string_view entry(*e);
    if (!extra.contains(std::string(entry.substr(0, entry.find('='))))) env.emplace_back(entry);
  }
  for (const auto& [name, value] : extra) env.push_back(name + "=" + value);
  return env;
}

std::vector<char*> Pointers(std::vector<std::string>& strings) {
  std::vector<char*> out;
  for (std::string& s : strings) out.push_back(s.data());
  out.push_back(nullptr);
  return out;
}

// An open file descriptor, closed at scope exit.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

absl::Status OpenOutput(const std::filesystem::path& path, bool append, Fd& out) {
  if (path.empty()) return absl::OkStatus();
  out.fd =
      ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0644);
  if (out.fd < 0)
    return absl::PermissionDeniedError(
        StrCat("cannot open ", path.string(), " for a child's output: ", std::strerror(errno)));
  return absl::OkStatus();
}

// posix_spawn's file actions and attributes, destroyed at scope exit.
struct SpawnSetup {
  posix_spawn_file_actions_t actions;
  posix_spawnattr_t attr;
  SpawnSetup() {
    posix_spawn_file_actions_init(&actions);
    posix_spawnattr_init(&attr);
  }
  ~SpawnSetup() {
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
  }
};

}  // namespace

std::string ExitStatus::ToString() const {
  if (signal == 0) return StrCat("exit code ", code);
  return StrCat("signal ", signal, " (", ::strsignal(signal), ")");
}

absl::StatusOr<Subprocess> Subprocess::Start(const std::vector<std::string>& argv,
                                             const SubprocessOptions& options) {
  if (argv.empty() || argv[0].empty())
    return absl::InvalidArgumentError("expected a program to run, got an empty argv");
  Fd out, err;
  if (absl::Status s = OpenOutput(options.stdout_file, options.append, out); !s.ok()) return s;
  if (absl::Status s = OpenOutput(options.stderr_file, options.append, err); !s.ok()) return s;
  SpawnSetup setup;
  if (out.fd >= 0) posix_spawn_file_actions_adddup2(&setup.actions, out.fd, STDOUT_FILENO);
  if (err.fd >= 0)
    posix_spawn_file_actions_adddup2(&setup.actions, err.fd, STDERR_FILENO);
  else if (out.fd >= 0)
    posix_spawn_file_actions_adddup2(&setup.actions, STDOUT_FILENO, STDERR_FILENO);
  if (!options.working_dir.empty())
    posix_spawn_file_actions_addchdir_np(&setup.actions, options.working_dir.c_str());
  sigset_t none, all;
  sigemptyset(&none);
  sigfillset(&all);
  sigdelset(&all, SIGKILL);
  sigdelset(&all, SIGSTOP);
  posix_spawnattr_setsigmask(&setup.attr, &none);
  posix_spawnattr_setsigdefault(&setup.attr, &all);
  posix_spawnattr_setflags(&setup.attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  std::vector<std::string> args = argv;
  std::vector<std::string> env = EnvironmentWith(options.environment);
  std::vector<char*> arg_ptrs = Pointers(args), env_ptrs = Pointers(env);
  pid_t pid = -1;
  const bool search = argv[0].find('/') == std::string::npos;
  const int error = search ? posix_spawnp(&pid, arg_ptrs[0], &setup.actions, &setup.attr,
                                          arg_ptrs.data(), env_ptrs.data())
                           : posix_spawn(&pid, arg_ptrs[0], &setup.actions, &setup.attr,
                                         arg_ptrs.data(), env_ptrs.data());
  if (error != 0) {
    const std::string where =
        options.working_dir.empty() ? "" : StrCat(" in ", options.working_dir.string());
    const std::string message = StrCat("cannot run ", argv[0], where, ": ", std::strerror(error),
                                       search ? " (looked up on PATH)" : "");
    return error == ENOENT ? absl::NotFoundError(message) : absl::InternalError(message);
  }
  return Subprocess(pid);
}

Subprocess::Subprocess(Subprocess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)), exit_(other.exit_) {}

Subprocess& Subprocess::operator=(Subprocess&& other) noexcept {
  if (this != &other) {
    KillAndReap();
    pid_ = std::exchange(other.pid_, -1);
    exit_ = other.exit_;
  }
  return *this;
}

Subprocess::~Subprocess() { KillAndReap(); }

void Subprocess::KillAndReap() {
  if (pid_ > 0) {
    ::kill(pid_, SIGKILL);
    Reap(pid_, 0);
    pid_ = -1;
  }
}

std::optional<ExitStatus> Subprocess::Poll() {
  if (pid_ > 0) {
    exit_ = Reap(pid_, WNOHANG);
    if (exit_) pid_ = -1;
  }
  return exit_;
}

ExitStatus Subprocess::Wait() {
  if (pid_ > 0) {
    exit_ = Reap(pid_, 0);
    pid_ = -1;
  }
  return exit_.value_or(ExitStatus{.code = -1, .signal = 0});
}

std::optional<ExitStatus> Subprocess::WaitFor(std::chrono::duration<double> timeout) {
  if (pid_ > 0) {
    exit_ = ReapWithin(pid_, timeout);
    if (exit_) pid_ = -1;
  }
  return exit_;
}

void Subprocess::Signal(int sig) {
  if (pid_ > 0) ::kill(pid_, sig);
}

ExitStatus Subprocess::Stop(std::chrono::duration<double> grace) {
  Signal(SIGTERM);
  if (auto exit = WaitFor(grace)) return *exit;
  Signal(SIGKILL);
  return Wait();
}

pid_t Subprocess::Release() { return std::exchange(pid_, -1); }

std::optional<ExitStatus> WaitForExit(pid_t pid, std::chrono::duration<double> timeout) {
  return ReapWithin(pid, timeout);
}

absl::StatusOr<ExitStatus> RunSubprocess(const std::vector<std::string>& argv,
                                         const SubprocessOptions& options,
                                         std::optional<std::chrono::duration<double>> timeout) {
  absl::StatusOr<Subprocess> child = Subprocess::Start(argv, options);
  if (!child.ok()) return child.status();
  if (!timeout) return child->Wait();
  if (std::optional<ExitStatus> exit = child->WaitFor(*timeout)) return *exit;
  child->Signal(SIGKILL);
  child->Wait();
  return absl::DeadlineExceededError(
      StrCat(argv[0], " did not end within ", timeout->count(), " s and was killed (SIGKILL)"));
}

}  // namespace fedlora::common
