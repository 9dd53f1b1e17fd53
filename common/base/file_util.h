// File helpers: read-only memory maps and atomic writes (temp file, fsync, rename), so a reader
// never sees a half-written file and a failed write leaves nothing behind.
#ifndef FEDLORA_COMMON_BASE_FILE_UTIL_H_
#define FEDLORA_COMMON_BASE_FILE_UTIL_H_

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/base/env.h"

namespace fedlora::common {

// Whether a read follows a symbolic link at the path's last component. kRefuse is for files another
// program wrote for fedlora to read (a command workload's output) and for the coordinator's state
// directory: a link there could make fedlora read, and send or print, a file of the user's it was
// never meant to see. Model and adapter directories a user names are read through links (Hugging
// Face's cache is made of them).
enum class Symlinks { kFollow, kRefuse };

// FAILED_PRECONDITION naming `path` and where it points when `path` is a symbolic link (a link
// that fedlora must not follow); OK otherwise, also when nothing is there.
absl::Status RefuseLink(const std::filesystem::path& path);

// A small JSON object of strings (the coordinator's pins.json, removed.json), rewritten whole.
using StringMap = std::map<std::string, std::string>;
// Empty when `path` does not exist; FAILED_PRECONDITION when it is a link; DATA_LOSS when it is not
// a JSON object of strings, saying it should map `what` ("client → why it was removed").
absl::StatusOr<StringMap> ReadStringMap(const std::filesystem::path& path, std::string_view what);

// A read-only memory map of a whole file. Empty files map to an empty span. Only regular files
// open (a FIFO or a device is refused, without blocking).
class MappedFile {
 public:
  static absl::StatusOr<MappedFile> Open(const std::filesystem::path& path,
                                         Symlinks symlinks = Symlinks::kFollow);
  MappedFile(MappedFile&& other) noexcept;
  MappedFile& operator=(MappedFile&& other) noexcept;
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;
  ~MappedFile();

  std::span<const uint8_t> bytes() const { return {data_, size_}; }

 private:
  MappedFile(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
};

absl::StatusOr<std::string> ReadFileToString(const std::filesystem::path& path,
                                             Symlinks symlinks = Symlinks::kFollow);

// Every write below goes through `env` (Env::Default() unless a caller passes another).

// Writes `path` atomically: the content goes to a temporary file beside it, is fsync'ed, and is
// renamed over `path`; the directory is fsync'ed after. `write` receives a FILE* open for writing
// and returns its status; on any failure the temporary file is removed and `path` is left as it
// was.
absl::Status WriteFileAtomically(const std::filesystem::path& path, const Env::WriteFn& write,
                                 Env* env = Env::Default());
absl::Status WriteFileAtomically(const std::filesystem::path& path, std::string_view content,
                                 Env* env = Env::Default());
absl::Status WriteStringMap(const std::filesystem::path& path, const StringMap& map,
                            Env* env = Env::Default());

// Writes `path` in place and fsyncs it; on failure the file is removed. For files inside a
// directory that BuildDirectoryAtomically publishes as a whole, where a per-file rename would add
// nothing.
absl::Status WriteFileSynced(const std::filesystem::path& path, const Env::WriteFn& write,
                             Env* env = Env::Default());
absl::Status WriteFileSynced(const std::filesystem::path& path, std::string_view content,
                             Env* env = Env::Default());

// Builds a directory atomically: `fill` writes into a fresh temporary directory beside `dir`, which
// is then renamed to `dir` (missing parent directories are created first). If `dir` exists it is
// replaced only when `overwrite` is set (the old one is swapped out in one step and then removed);
// otherwise the call fails and changes nothing. On any failure the temporary directory is removed,
// so a failed build never leaves `dir` half-written. `dir` may end in a slash ("out/").
absl::Status BuildDirectoryAtomically(
    const std::filesystem::path& dir, bool overwrite,
    const std::function<absl::Status(const std::filesystem::path&)>& fill,
    Env* env = Env::Default());

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_FILE_UTIL_H_
