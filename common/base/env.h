// Env: every way fedlora's durable state touches the outside world — creating, writing, syncing,
// renaming, listing and removing files, and reading the clock — behind one interface, in the
// spirit of leveldb's Env. Env::Default() is the real one (POSIX calls, std::chrono clocks); tests
// substitute one that fails the n-th write with ENOSPC or EIO and moves time by hand
// (tests/test_env.h), which is how the coordinator's round-close transaction is tested against
// every write it makes. Reading goes through common::MappedFile / ReadFileToString: a failed
// read changes nothing on disk, so it has nothing to inject.
//
// Every method is safe to call from several threads at once.
#ifndef FEDLORA_COMMON_BASE_ENV_H_
#define FEDLORA_COMMON_BASE_ENV_H_

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace fedlora::common {

class Env {
 public:
  using Path = std::filesystem::path;
  using SteadyTime = std::chrono::steady_clock::time_point;
  // Fills a file open for writing; returns its status.
  using WriteFn = std::function<absl::Status(std::FILE*)>;

  virtual ~Env() = default;

  // The process-wide real Env. Never deleted; callers must not delete it.
  static Env* Default();

  // Creates `path` (or truncates it), lets `write` fill it, then flushes, fsyncs and closes it.
  // On any failure the file is removed. Errors name the path and the system's reason.
  virtual absl::Status WriteFile(const Path& path, const WriteFn& write) = 0;
  // Writes `data` at byte `offset` of the existing file `path` (not synced: see Sync).
  virtual absl::Status WriteAt(const Path& path, int64_t offset, std::string_view data) = 0;
  // fsync of a file or directory.
  virtual absl::Status Sync(const Path& path) = 0;
  // rename(2): replaces `to` if it is a file (or an empty directory).
  virtual absl::Status Rename(const Path& from, const Path& to) = 0;
  // Swaps two existing paths in one step (renameat2 RENAME_EXCHANGE).
  virtual absl::Status Exchange(const Path& a, const Path& b) = 0;
  // mkdir -p.
  virtual absl::Status CreateDirectories(const Path& dir) = 0;
  // rm -rf; a missing path is not an error.
  virtual absl::Status RemoveAll(const Path& path) = 0;
  // The entries of `dir` (full paths, sorted by name).
  virtual absl::StatusOr<std::vector<Path>> ListDirectory(const Path& dir) = 0;

  // Monotonic time, for deadlines and timeouts.
  virtual SteadyTime Now() = 0;
  // Wall-clock time in milliseconds since the Unix epoch, for people and logs.
  virtual int64_t NowUnixMs() = 0;
};

// "<what> <path>: <strerror(err)>" with the code that fits errno: NOT_FOUND, PERMISSION_DENIED,
// RESOURCE_EXHAUSTED (ENOSPC, EDQUOT: the disk is full), INTERNAL otherwise.
absl::Status ErrnoError(std::string_view what, const std::filesystem::path& path, int err);

// A name beside `path` for a temporary file or directory, unique within this machine for the
// life of the process: ".<filename>.tmp.<pid>.<counter>".
std::filesystem::path TempPathFor(const std::filesystem::path& path);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_ENV_H_
