#include "common/base/env.h"

#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <system_error>

#include "common/base/strings.h"

namespace fedlora::common {
namespace fs = std::filesystem;

absl::Status ErrnoError(std::string_view what, const fs::path& path, int err) {
  std::string message = StrCat(what, " ", path.string(), ": ", std::strerror(err));
  switch (err) {
    case ELOOP:  // opened with O_NOFOLLOW
      return absl::FailedPreconditionError(StrCat(
          what, " ", path.string(), ": it is a symbolic link, which fedlora does not follow"));
    case ENOENT:
      return absl::NotFoundError(message);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(message);
    case ENOSPC:
    case EDQUOT:
      return absl::ResourceExhaustedError(message);
    default:
      return absl::InternalError(message);
  }
}

fs::path TempPathFor(const fs::path& path) {
  static std::atomic<uint64_t> counter{0};
  fs::path parent = path.parent_path();
  if (parent.empty()) parent = ".";
  return parent / StrCat(".", path.filename().string(), ".tmp.", ::getpid(), ".", counter++);
}

namespace {

class PosixEnv final : public Env {
 public:
  absl::Status WriteFile(const Path& path, const WriteFn& write) override {
    // Never through a link: a link planted where fedlora writes must not redirect the write.
    int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
    if (fd < 0) return ErrnoError("cannot create", path, errno);
    std::FILE* out = ::fdopen(fd, "wb");
    if (out == nullptr) {
      int err = errno;
      ::close(fd);
      ::unlink(path.c_str());
      return ErrnoError("cannot open", path, err);
    }
    absl::Status status = write(out);
    if (status.ok() && std::fflush(out) != 0) status = ErrnoError("cannot write", path, errno);
    if (status.ok() && ::fsync(::fileno(out)) != 0)
      status = ErrnoError("cannot fsync", path, errno);
    if (std::fclose(out) != 0 && status.ok()) status = ErrnoError("cannot close", path, errno);
    if (!status.ok()) ::unlink(path.c_str());
    return status;
  }

  absl::Status WriteAt(const Path& path, int64_t offset, std::string_view data) override {
    int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0) return ErrnoError("cannot open", path, errno);
    size_t done = 0;
    while (done < data.size()) {
      const ssize_t n =
          ::pwrite(fd, data.data() + done, data.size() - done, offset + static_cast<int64_t>(done));
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) {
        int err = n < 0 ? errno : EIO;
        ::close(fd);
        return ErrnoError("cannot write", path, err);
      }
      done += static_cast<size_t>(n);
    }
    ::close(fd);
    return absl::OkStatus();
  }

  absl::Status Sync(const Path& path) override {
    int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) return ErrnoError("cannot open", path, errno);
    int rc = ::fsync(fd);
    int err = errno;
    ::close(fd);
    if (rc != 0) return ErrnoError("cannot fsync", path, err);
    return absl::OkStatus();
  }

  absl::Status Rename(const Path& from, const Path& to) override {
    if (::rename(from.c_str(), to.c_str()) != 0)
      return ErrnoError(StrCat("cannot rename ", from.string(), " to"), to, errno);
    return absl::OkStatus();
  }

  absl::Status Exchange(const Path& a, const Path& b) override {
    if (::renameat2(AT_FDCWD, a.c_str(), AT_FDCWD, b.c_str(), RENAME_EXCHANGE) != 0)
      return ErrnoError(StrCat("cannot swap ", a.string(), " with"), b, errno);
    return absl::OkStatus();
  }

  absl::Status CreateDirectories(const Path& dir) override {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return ErrnoError("cannot create directory", dir, ec.value());
    return absl::OkStatus();
  }

  absl::Status RemoveAll(const Path& path) override {
    std::error_code ec;
    fs::remove_all(path, ec);
    if (ec) return ErrnoError("cannot remove", path, ec.value());
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<Path>> ListDirectory(const Path& dir) override {
    std::error_code ec;
    std::vector<Path> entries;
    for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec))
      entries.push_back(it->path());
    if (ec) return ErrnoError("cannot list", dir, ec.value());
    std::sort(entries.begin(), entries.end());
    return entries;
  }

  SteadyTime Now() override { return std::chrono::steady_clock::now(); }

  int64_t NowUnixMs() override {
    return std::chrono::duration_cast<std::chrono::milliseconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

}  // namespace

Env* Env::Default() {
  static Env* const env = new PosixEnv;  // never destroyed: usable until the process exits
  return env;
}

}  // namespace fedlora::common
