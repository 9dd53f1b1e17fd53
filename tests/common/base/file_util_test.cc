#include "common/base/file_util.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "tests/scratch_dir.h"

namespace fedlora::common {
namespace {

namespace fs = std::filesystem;

size_t CountEntries(const fs::path& dir) {
  return static_cast<size_t>(std::distance(fs::directory_iterator(dir), fs::directory_iterator()));
}

TEST(FileUtilTest, AtomicWriteReplacesOrLeavesTheOldFile) {
  testing::ScratchDir dir;
  ASSERT_TRUE(WriteFileAtomically(dir / "f", "one").ok());
  EXPECT_EQ(*ReadFileToString(dir / "f"), "one");
  absl::Status st = WriteFileAtomically(dir / "f", [](std::FILE* out) {
    std::fputs("partial", out);
    return absl::InternalError("disk on fire");
  });
  EXPECT_EQ(st.message(), "disk on fire");
  EXPECT_EQ(*ReadFileToString(dir / "f"), "one");  // the old content survives a failed write
  EXPECT_EQ(CountEntries(dir.path()), 1u);         // and no temporary is left behind
}

TEST(FileUtilTest, FailedDirectoryBuildLeavesNothing) {
  testing::ScratchDir dir;
  absl::Status st = BuildDirectoryAtomically(dir / "out", false, [](const fs::path& tmp) {
    std::ofstream(tmp / "a") << "x";
    return absl::InvalidArgumentError("bad input");
  });
  EXPECT_EQ(st.message(), "bad input");
  EXPECT_EQ(CountEntries(dir.path()), 0u);
  // Missing parents are made, as PEFT's save_pretrained does.
  EXPECT_TRUE(BuildDirectoryAtomically(dir / "new" / "out", false, [](const fs::path&) {
                return absl::OkStatus();
              }).ok());
  EXPECT_TRUE(fs::is_directory(dir / "new" / "out"));
  // A file where a parent should be is an error.
  std::ofstream(dir / "file") << "x";
  EXPECT_FALSE(BuildDirectoryAtomically(dir / "file" / "out", false, [](const fs::path&) {
                 return absl::OkStatus();
               }).ok());
}

// Regression (issue 31): with a trailing slash the temporary directory was made inside the target,
// the rename failed ("Directory not empty") and an empty target was left behind.
TEST(FileUtilTest, ADirectoryNamedWithATrailingSlashIsBuiltBesideItsParent) {
  testing::ScratchDir dir;
  const auto fill = [](const fs::path& tmp) {
    std::ofstream(tmp / "a") << "x";
    return absl::OkStatus();
  };
  const fs::path cwd = fs::current_path();
  fs::current_path(dir.path());
  for (const std::string& out :
       std::vector<std::string>{"rel/", "./dot/", "./nested/deeper/", (dir / "abs/").string()}) {
    SCOPED_TRACE(out);
    EXPECT_TRUE(BuildDirectoryAtomically(out, false, fill).ok());
    EXPECT_EQ(*ReadFileToString(fs::path(out) / "a"), "x");
    EXPECT_EQ(CountEntries(out), 1u);                               // no temporary inside
    EXPECT_TRUE(BuildDirectoryAtomically(out, true, fill).ok());    // replaced in one step
    EXPECT_FALSE(BuildDirectoryAtomically(out, false, fill).ok());  // exists
  }
  EXPECT_FALSE(BuildDirectoryAtomically("failed/", false, [](const fs::path&) {
                 return absl::InternalError("disk on fire");
               }).ok());
  EXPECT_FALSE(fs::exists(dir / "failed"));
  fs::current_path(cwd);
  // Beside the targets: the four directories and nothing else (no temporaries, no "failed").
  EXPECT_EQ(CountEntries(dir.path()), 4u);
  EXPECT_EQ(CountEntries(dir / "nested"), 1u);
}

TEST(FileUtilTest, MapsEmptyAndMissingFiles) {
  testing::ScratchDir dir;
  ASSERT_TRUE(WriteFileAtomically(dir / "empty", "").ok());
  auto m = MappedFile::Open(dir / "empty");
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(m->bytes().empty());
  EXPECT_TRUE(absl::IsNotFound(MappedFile::Open(dir / "missing").status()));
  EXPECT_FALSE(MappedFile::Open(dir.path()).ok());  // a directory is not a file
}

}  // namespace
}  // namespace fedlora::common
