#include "common/base/file_util.h"

#include <fcntl.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <nlohmann/json.hpp>
#include <system_error>

#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace fs = std::filesystem;

namespace {

// The parent directory to create temporaries in ("." for a bare file name).
fs::path ParentOf(const fs::path& path) {
  fs::path parent = path.parent_path();
  return parent.empty() ? fs::path(".") : parent;
}

}  // namespace

absl::StatusOr<MappedFile> MappedFile::Open(const fs::path& path, Symlinks symlinks) {
  // O_NONBLOCK: opening a FIFO would otherwise wait for a writer; it is refused below instead.
  const int nofollow = symlinks == Symlinks::kRefuse ? O_NOFOLLOW : 0;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | nofollow);
  if (fd < 0 && errno == ELOOP && nofollow) {
    return absl::InvalidArgumentError(
        StrCat(path.string(),
               " is a symbolic link; fedlora does not follow links here (put the file itself "
               "there)"));
  }
  if (fd < 0) return ErrnoError("cannot open", path, errno);
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoError("cannot stat", path, err);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(StrCat(path.string(), " is not a regular file (a ",
                                             S_ISFIFO(st.st_mode)  ? "FIFO"
                                             : S_ISDIR(st.st_mode) ? "directory"
                                             : S_ISCHR(st.st_mode) ? "character device"
                                                                   : "special file",
                                             ")"));
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

absl::Status RefuseLink(const fs::path& path) {
  std::error_code ec;
  if (!fs::is_symlink(fs::symlink_status(path, ec))) return absl::OkStatus();
  return absl::FailedPreconditionError(StrCat(
      path.string(), " is a symbolic link (to ", fs::read_symlink(path, ec).string(),
      "); fedlora does not follow links there: put the file or directory itself in its place"));
}

absl::StatusOr<StringMap> ReadStringMap(const fs::path& path, std::string_view what) {
  RETURN_IF_ERROR(RefuseLink(path));
  StringMap map;
  if (!fs::exists(path)) return map;
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(path, Symlinks::kRefuse));
  const nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_object()) {
    for (const auto& [key, value] : j.items())
      if (value.is_string()) map[key] = value.get<std::string>();
  }
  if (!j.is_object() || map.size() != j.size()) {
    return absl::DataLossError(
        StrCat(path.string(), " is not a JSON object of ", what, " (as fedlora writes it)"));
  }
  return map;
}

absl::Status WriteStringMap(const fs::path& path, const StringMap& map, Env* env) {
  return WriteFileAtomically(path, nlohmann::json(map).dump(2) + "\n", env);
}

absl::StatusOr<std::string> ReadFileToString(const fs::path& path, Symlinks symlinks) {
  ASSIGN_OR_RETURN(MappedFile file, MappedFile::Open(path, symlinks));
  auto bytes = file.bytes();
  return std::string(reinterpret_cast<const char*>(bytes.data()), bytes.size());
}

namespace {
Env::WriteFn WriteAll(const fs::path& path, std::string_view content) {
  return [path, content](std::FILE* out) {
    if (std::fwrite(content.data(), 1, content.size(), out) != content.size())
      return ErrnoError("cannot write", path, errno);
    return absl::OkStatus();
  };
}
}  // namespace

absl::Status WriteFileSynced(const fs::path& path, const Env::WriteFn& write, Env* env) {
  return env->WriteFile(path, write);
}

absl::Status WriteFileSynced(const fs::path& path, std::string_view content, Env* env) {
  return env->WriteFile(path, WriteAll(path, content));
}

absl::Status WriteFileAtomically(const fs::path& path, const Env::WriteFn& write, Env* env) {
  const fs::path tmp = TempPathFor(path);
  RETURN_IF_ERROR(env->WriteFile(tmp, write));  // removes tmp on failure
  if (absl::Status st = env->Rename(tmp, path); !st.ok()) {
    env->RemoveAll(tmp).IgnoreError();
    return st;
  }
  return env->Sync(ParentOf(path));
}

absl::Status WriteFileAtomically(const fs::path& path, std::string_view content, Env* env) {
  return WriteFileAtomically(path, WriteAll(path, content), env);
}

absl::Status BuildDirectoryAtomically(const fs::path& requested, bool overwrite,
                                      const std::function<absl::Status(const fs::path&)>& fill,
                                      Env* env) {
  // "out", "out/" and "./out/" name one directory; the temporary must sit beside it, not in it.
  fs::path dir = requested.lexically_normal();
  if (!dir.has_filename() && dir.has_relative_path()) dir = dir.parent_path();
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
  if (absl::Status st = env->CreateDirectories(parent); !st.ok()) {
    return absl::Status(st.code(), StrCat("cannot create the parent directory of ", dir.string(),
                                          ": ", st.message()));
  }
  const fs::path tmp = TempPathFor(dir);
  RETURN_IF_ERROR(env->CreateDirectories(tmp));
  RETURN_IF_ERROR(RefuseLink(tmp));  // a link planted there would take the files elsewhere
  auto cleanup = [&](absl::Status status) {
    env->RemoveAll(tmp).IgnoreError();
    return status;
  };
  if (absl::Status st = fill(tmp); !st.ok()) return cleanup(st);
  if (absl::Status st = env->Sync(tmp); !st.ok()) return cleanup(st);
  if (exists) {
    // Swap the finished directory with the old one in one step, then remove the old one.
    if (absl::Status st = env->Exchange(tmp, dir); !st.ok()) return cleanup(st);
    env->RemoveAll(tmp).IgnoreError();
  } else if (absl::Status st = env->Rename(tmp, dir); !st.ok()) {
    return cleanup(st);
  }
  return env->Sync(parent);
}

}  // namespace fedlora::common
