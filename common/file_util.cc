#include "common/file_util.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <system_error>

#include "common/status_macros.h"
#include "common/strings.h"

namespace fedlora::common {
namespace fs = std::filesystem;

namespace {

absl::Status ErrnoError(std::string_view what, const fs::path& path, int err) {
  std::string message = StrCat(what, " ", path.string(), ": ", std::strerror(err));
  if (err == ENOENT) return absl::NotFoundError(message);
  if (err == EACCES || err == EPERM) return absl::PermissionDeniedError(message);
  return absl::InternalError(message);
}

// The parent directory to create temporaries in ("." for a bare file name).
fs::path ParentOf(const fs::path& path) {
  fs::path parent = path.parent_path();
  return parent.empty() ? fs::path(".") : parent;
}

}  // namespace

absl::StatusOr<MappedFile> MappedFile::Open(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoError("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(StrCat(path.string(), " is not a regular file"));
  }
  size_t size = static_cast<size_t>(st.st_size);
  if (size == 0) {
    ::close(fd);
    return MappedFile(nullptr, 0);
  }
  void* data = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  int err = errno;
  ::close(fd);
  if (data == MAP_FAILED) return ErrnoError("cannot map", path, err);
  return MappedFile(static_cast<const uint8_t*>(data), size);
}

MappedFile::MappedFile(MappedFile&& other) noexcept : data_(other.data_), size_(other.size_) {
  other.data_ = nullptr;
  other.size_ = 0;
}

MappedFile& MappedFile::operator=(MappedFile&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
    data_ = other.data_;
    size_ = other.size_;
    other.data_ = nullptr;
    other.size_ = 0;
  }
  return *this;
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<uint8_t*>(data_), size_);
}

absl::StatusOr<std::string> ReadFileToString(const fs::path& path) {
  ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path));
  auto bytes = file.bytes();
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

absl::Status SyncPath(const fs::path& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return ErrnoError("cannot fsync", path, err);
  return absl::OkStatus();
}

namespace {

// Writes through `write` into the open descriptor `fd` of `path`, then flushes, fsyncs and closes
// it.
absl::Status WriteAndSync(int fd, const fs::path& path,
                          const std::function<absl::Status(std::FILE*)>& write) {
  std::FILE* out = ::fdopen(fd, "wb");
  if (out == nullptr) {
    int err = errno;
    ::close(fd);
    return ErrnoError("cannot open", path, err);
  }
  absl::Status status = write(out);
  if (status.ok() && std::fflush(out) != 0) status = ErrnoError("cannot write", path, errno);
  if (status.ok() && ::fsync(::fileno(out)) != 0) status = ErrnoError("cannot fsync", path, errno);
  if (std::fclose(out) != 0 && status.ok()) status = ErrnoError("cannot close", path, errno);
  return status;
}

}  // namespace

absl::Status WriteFileSynced(const fs::path& path,
                             const std::function<absl::Status(std::FILE*)>& write) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError("cannot create", path, errno);
  absl::Status status = WriteAndSync(fd, path, write);
  if (!status.ok()) ::unlink(path.c_str());
  return status;
}

absl::Status WriteFileAtomically(const fs::path& path,
                                 const std::function<absl::Status(std::FILE*)>& write) {
  std::string tmpl = (ParentOf(path) / ("." + path.filename().string() + ".tmp.XXXXXX")).string();
  int fd = ::mkstemp(tmpl.data());
  if (fd < 0) return ErrnoError("cannot create a temporary file for", path, errno);
  const fs::path tmp = tmpl;
  absl::Status status = WriteAndSync(fd, tmp, write);
  if (status.ok() && ::rename(tmp.c_str(), path.c_str()) != 0) {
    status = ErrnoError(StrCat("cannot rename ", tmp.string(), " to"), path, errno);
  }
  if (!status.ok()) {
    ::unlink(tmp.c_str());
    return status;
  }
  return SyncPath(ParentOf(path));
}

namespace {
std::function<absl::Status(std::FILE*)> WriteAll(const fs::path& path, std::string_view content) {
  return [path, content](std::FILE* out) {
    if (std::fwrite(content.data(), 1, content.size(), out) != content.size())
      return ErrnoError("cannot write", path, errno);
    return absl::OkStatus();
  };
}
}  // namespace

absl::Status WriteFileSynced(const fs::path& path, std::string_view content) {
  return WriteFileSynced(path, WriteAll(path, content));
}

absl::Status WriteFileAtomically(const fs::path& path, std::string_view content) {
  return WriteFileAtomically(path, WriteAll(path, content));
}

absl::Status BuildDirectoryAtomically(const fs::path& dir, bool overwrite,
                                      const std::function<absl::Status(const fs::path&)>& fill) {
  std::error_code ec;
  const bool exists = fs::symlink_status(dir, ec).type() != fs::file_type::not_found;
  if (exists && !overwrite) {
    return absl::AlreadyExistsError(
        StrCat("output ", dir.string(), " already exists; choose a new path or allow overwriting"));
  }
  if (exists && !fs::is_directory(dir)) {
    return absl::FailedPreconditionError(
        StrCat("output ", dir.string(), " exists and is not a directory; refusing to replace it"));
  }
  const fs::path parent = ParentOf(dir);
  if (fs::create_directories(parent, ec); ec) {
    return absl::FailedPreconditionError(StrCat("cannot create the parent directory ",
                                                parent.string(), " of ", dir.string(), ": ",
                                                ec.message()));
  }
  std::string tmpl = (parent / ("." + dir.filename().string() + ".tmp.XXXXXX")).string();
  if (::mkdtemp(tmpl.data()) == nullptr)
    return ErrnoError("cannot create a temporary directory for", dir, errno);
  const fs::path tmp = tmpl;
  auto cleanup = [&](absl::Status status) {
    fs::remove_all(tmp, ec);
    return status;
  };
  if (absl::Status st = fill(tmp); !st.ok()) return cleanup(st);
  if (absl::Status st = SyncPath(tmp); !st.ok()) return cleanup(st);
  if (exists) {
    // Swap the finished directory with the old one in one step, then remove the old one.
    if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, dir.c_str(), RENAME_EXCHANGE) != 0) {
      return cleanup(ErrnoError("cannot replace", dir, errno));
    }
    fs::remove_all(tmp, ec);
  } else if (::rename(tmp.c_str(), dir.c_str()) != 0) {
    return cleanup(ErrnoError(StrCat("cannot rename ", tmp.string(), " to"), dir, errno));
  }
  return SyncPath(parent);
}

}  // namespace fedlora::common
