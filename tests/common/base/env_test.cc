// The real Env against the file system, and the test Env's fault injection against what the real
// one would leave behind.
#include "common/base/env.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "tests/scratch_dir.h"
#include "tests/test_env.h"

namespace fedlora::common {
namespace {

namespace fs = std::filesystem;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

TEST(EnvTest, WritesSyncsRenamesListsAndRemoves) {
  testing::ScratchDir dir;
  Env* env = Env::Default();
  ASSERT_TRUE(env->CreateDirectories(dir / "a" / "b").ok());
  ASSERT_TRUE(env->WriteFile(dir / "a" / "f",
                             [](std::FILE* out) {
                               std::fputs("hello world", out);
                               return absl::OkStatus();
                             })
                  .ok());
  ASSERT_TRUE(env->WriteAt(dir / "a" / "f", 6, "there").ok());
  EXPECT_EQ(*ReadFileToString(dir / "a" / "f"), "hello there");
  ASSERT_TRUE(env->Sync(dir / "a" / "f").ok());
  ASSERT_TRUE(env->Sync(dir / "a").ok());
  ASSERT_TRUE(env->Rename(dir / "a" / "f", dir / "a" / "g").ok());
  auto listed = env->ListDirectory(dir / "a");
  ASSERT_TRUE(listed.ok());
  EXPECT_THAT(*listed, ElementsAre(dir / "a" / "b", dir / "a" / "g"));
  ASSERT_TRUE(env->RemoveAll(dir / "a").ok());
  EXPECT_FALSE(fs::exists(dir / "a"));
  EXPECT_TRUE(env->RemoveAll(dir / "a").ok());  // already gone: not an error
}

TEST(EnvTest, ErrorsNameThePathAndTheReasonWithAFittingCode) {
  testing::ScratchDir dir;
  absl::Status st = Env::Default()->WriteAt(dir / "missing", 0, "x");
  EXPECT_TRUE(absl::IsNotFound(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr((dir / "missing").string()));
  EXPECT_THAT(st.message(), HasSubstr("No such file or directory"));
  EXPECT_TRUE(absl::IsResourceExhausted(ErrnoError("cannot write", "f", ENOSPC)));
  EXPECT_THAT(ErrnoError("cannot write", "f", ENOSPC).message(),
              HasSubstr("No space left on device"));
}

TEST(EnvTest, AFailedWriteFileLeavesNoFile) {
  testing::ScratchDir dir;
  absl::Status st = Env::Default()->WriteFile(dir / "f", [](std::FILE* out) {
    std::fputs("partial", out);
    return absl::InternalError("disk on fire");
  });
  EXPECT_EQ(st.message(), "disk on fire");
  EXPECT_FALSE(fs::exists(dir / "f"));
}

TEST(TestEnvTest, FailsExactlyTheNthWriteOrEveryWriteFromItUntilHealed) {
  testing::ScratchDir dir;
  testing::TestEnv env;
  EXPECT_TRUE(WriteFileAtomically(dir / "a", "1", &env).ok());  // writes 1-3: file, rename, dir
  EXPECT_EQ(env.writes(), 3);
  env.FailWrite(2, EIO);  // the rename of the next atomic write
  absl::Status st = WriteFileAtomically(dir / "b", "2", &env);
  EXPECT_TRUE(absl::IsInternal(st)) << st;
  EXPECT_THAT(st.message(), HasSubstr("Input/output error"));
  EXPECT_FALSE(fs::exists(dir / "b"));
  EXPECT_TRUE(WriteFileAtomically(dir / "b", "2", &env).ok());  // only that one failed

  env.FailWrite(2, ENOSPC, /*sticky=*/true);  // the temporary file, then its rename fails: full
  st = WriteFileAtomically(dir / "a", "new", &env);
  EXPECT_TRUE(absl::IsResourceExhausted(st)) << st;
  EXPECT_EQ(*ReadFileToString(dir / "a"), "1");  // the old content survives
  EXPECT_FALSE(WriteFileAtomically(dir / "c", "3", &env).ok());
  env.Heal();
  EXPECT_TRUE(WriteFileAtomically(dir / "c", "3", &env).ok());
  // Nothing but the three files: no temporary is left behind by any failure.
  auto listed = Env::Default()->ListDirectory(dir.path());
  ASSERT_TRUE(listed.ok());
  EXPECT_EQ(listed->size(), 3u);
  EXPECT_THAT(env.log()[4], HasSubstr("FAILED Rename"));
}

TEST(TestEnvTest, TheClockMovesOnlyWhenAdvanced) {
  testing::TestEnv env;
  const auto t0 = env.Now();
  EXPECT_EQ(env.Now(), t0);
  env.Advance(std::chrono::milliseconds(1500));
  EXPECT_EQ(env.Now() - t0, std::chrono::milliseconds(1500));
  EXPECT_EQ(env.NowUnixMs() % 1000, (1'700'000'000'000 + 3'601'500) % 1000);
}

TEST(TestEnvTest, ADirectoryBuildThatFailsAtAnyWriteLeavesTheOldDirectory) {
  testing::ScratchDir dir;
  auto build = [&](std::string_view content, Env* env) {
    return BuildDirectoryAtomically(
        dir / "out", /*overwrite=*/true,
        [&](const fs::path& tmp) {
          RETURN_IF_ERROR(WriteFileSynced(tmp / "x", content, env));
          return WriteFileSynced(tmp / "y", content, env);
        },
        env);
  };
  ASSERT_TRUE(build("old", Env::Default()).ok());
  testing::TestEnv counting;
  ASSERT_TRUE(build("old", &counting).ok());
  const int64_t writes = counting.writes();
  ASSERT_GE(writes, 5);
  for (int64_t n = 1; n <= writes; ++n) {
    testing::TestEnv env;
    env.FailWrite(n, ENOSPC);
    const absl::Status st = build("new", &env);
    // Every failure is reported; only the last write, the parent's fsync after the swap, fails
    // with the new directory already in place.
    EXPECT_FALSE(st.ok()) << "write " << n;
    EXPECT_EQ(*ReadFileToString(dir / "out" / "x"), n == writes ? "new" : "old") << n;
    EXPECT_EQ(*ReadFileToString(dir / "out" / "y"), *ReadFileToString(dir / "out" / "x")) << n;
    auto listed = Env::Default()->ListDirectory(dir.path());
    ASSERT_TRUE(listed.ok());
    EXPECT_EQ(listed->size(), 1u) << "write " << n << " left a temporary behind";
    ASSERT_TRUE(build("old", Env::Default()).ok());
  }
}

}  // namespace
}  // namespace fedlora::common
