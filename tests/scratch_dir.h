// A scratch directory for tests: fresh under the system temp dir (TMPDIR), removed at destruction
// unless FEDLORA_KEEP_SCRATCH is set (to look at a test's state directories and logs afterwards;
// tests/bench/norm_ratios.py measures the honest update norms of the federation tests so).
#ifndef FEDLORA_TESTS_SCRATCH_DIR_H_
#define FEDLORA_TESTS_SCRATCH_DIR_H_

#include <stdlib.h>

#include <filesystem>
#include <string>
#include <system_error>

namespace fedlora::testing {

// A fresh directory under the system temp dir, removed at destruction (but see above).
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "fedlora-test-XXXXXX").string();
    path_ = ::mkdtemp(tmpl.data());
  }
  ~ScratchDir() {
    if (::getenv("FEDLORA_KEEP_SCRATCH") != nullptr) return;
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

}  // namespace fedlora::testing

#endif  // FEDLORA_TESTS_SCRATCH_DIR_H_
