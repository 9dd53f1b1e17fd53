// The state store (server/state_store.h): content-addressed blobs read back by range, the ledger
// replaced atomically or not at all, uploads spooled in any order and adopted as blobs, and a
// state directory whose ledger is damaged or names a missing blob refused at open with what is
// wrong.
#include "server/state_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "common/base/file_util.h"
#include "common/tensor/blob.h"
#include "tests/scratch_dir.h"
#include "tests/test_env.h"

namespace fedlora::server {
namespace {

using ::testing::HasSubstr;
using testing_dir = fedlora::testing::ScratchDir;

Ledger OneVersion(const BlobRef& blob) {
  Ledger l;
  l.run_id = "fedit-1";
  l.base_model_sha256 = std::string(64, 'a');
  l.modules = {{"m.q_proj", 4, 3}};
  l.versions.push_back({0, {blob}, std::nullopt, std::nullopt});
  return l;
}

TEST(StateStoreTest, BlobsAreNamedByTheirSha256AndReadBackByRange) {
  testing_dir dir;
  fedlora::testing::TestEnv env;
  auto store = StateStore::Open(dir.path(), &env);
  ASSERT_TRUE(store.ok()) << store.status();
  auto blob = store->PutBlob("0123456789", BlobKind::kAdapter, 0);
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(blob->sha256, common::Sha256Hex("0123456789"));
  EXPECT_EQ(blob->size, 10);
  const int64_t writes = env.writes();
  ASSERT_TRUE(store->PutBlob("0123456789", BlobKind::kAdapter, 0).ok());
  EXPECT_EQ(env.writes(), writes);  // there already: nothing written
  auto chunk = store->ReadBlob(blob->sha256, 3, 4);
  ASSERT_TRUE(chunk.ok());
  EXPECT_EQ(chunk->first, "3456");
  EXPECT_EQ(chunk->second, 10);
  EXPECT_EQ(store->ReadBlob(blob->sha256, 8, 100)->first, "89");
  EXPECT_TRUE(absl::IsOutOfRange(store->ReadBlob(blob->sha256, 11, 1).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(store->ReadBlob("../ledger.json", 0, 1).status()));
  EXPECT_TRUE(absl::IsNotFound(store->ReadBlob(std::string(64, 'e'), 0, 1).status()));
}

TEST(StateStoreTest, AFailedLedgerSaveLeavesTheOldOneOnDiskAndInMemory) {
  testing_dir dir;
  fedlora::testing::TestEnv env;
  auto store = StateStore::Open(dir.path(), &env);
  ASSERT_TRUE(store.ok());
  const BlobRef blob = *store->PutBlob("v0", BlobKind::kAdapter, 0);
  ASSERT_TRUE(store->SaveLedger(OneVersion(blob)).ok());
  const std::string before = *common::ReadFileToString(dir.path() / "ledger.json");
  Ledger next = store->ledger();
  next.versions.push_back({1, {blob}, std::nullopt, std::nullopt});
  env.FailWrite(1);
  EXPECT_FALSE(store->SaveLedger(next).ok());
  EXPECT_EQ(store->ledger().latest(), 0);
  EXPECT_EQ(*common::ReadFileToString(dir.path() / "ledger.json"), before);
  // What was saved is what a new process opens.
  auto reopened = StateStore::Open(dir.path(), &env);
  ASSERT_TRUE(reopened.ok()) << reopened.status();
  EXPECT_EQ(reopened->ledger().ToJson(), store->ledger().ToJson());
}

TEST(StateStoreTest, PartsArriveInAnyOrderAndAreAdoptedAsBlobs) {
  testing_dir dir;
  fedlora::testing::TestEnv env;
  auto store = StateStore::Open(dir.path(), &env);
  ASSERT_TRUE(store.ok());
  ASSERT_TRUE(store->StartPart("p").ok());
  ASSERT_TRUE(store->WritePart("p", 5, "world").ok());
  ASSERT_TRUE(store->WritePart("p", 0, "hello").ok());
  auto mapped = store->MapPart("p");
  ASSERT_TRUE(mapped.ok());
  EXPECT_EQ(
      std::string(reinterpret_cast<const char*>(mapped->bytes().data()), mapped->bytes().size()),
      "helloworld");
  const std::string sha = common::Sha256Hex("helloworld");
  ASSERT_TRUE(store->AdoptPart("p", sha).ok());
  EXPECT_EQ(*store->ReadWholeBlob(sha), "helloworld");
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "incoming" / "p"));
  // A new process drops what the last one was receiving.
  ASSERT_TRUE(store->StartPart("q").ok());
  ASSERT_TRUE(StateStore::Open(dir.path(), &env).ok());
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "incoming" / "q"));
}

TEST(StateStoreTest, ADamagedStateDirectoryIsRefusedWithWhatIsWrong) {
  testing_dir dir;
  fedlora::testing::TestEnv env;
  {
    auto store = StateStore::Open(dir.path(), &env);
    ASSERT_TRUE(store.ok());
    ASSERT_TRUE(store->SaveLedger(OneVersion(*store->PutBlob("v0", BlobKind::kAdapter, 0))).ok());
  }
  const std::string sha = common::Sha256Hex("v0");
  std::filesystem::remove(dir.path() / "blobs" / sha);
  auto open = StateStore::Open(dir.path(), &env);
  EXPECT_TRUE(absl::IsDataLoss(open.status()));
  EXPECT_THAT(open.status().message(),
              HasSubstr("names blob " + sha + " (version 0) but blobs/ does not hold it"));
  nlohmann::json ledger =
      nlohmann::json::parse(*common::ReadFileToString(dir.path() / "ledger.json"));
  ledger["modules"][0]["name"] = 42;
  ASSERT_TRUE(common::WriteFileAtomically(dir.path() / "ledger.json", ledger.dump()).ok());
  open = StateStore::Open(dir.path(), &env);
  EXPECT_THAT(open.status().message(),
              HasSubstr("ledger.json: /modules/0/name: expected a string"));
  ASSERT_TRUE(common::WriteFileAtomically(dir.path() / "ledger.json", "{\"format\":").ok());
  EXPECT_THAT(StateStore::Open(dir.path(), &env).status().message(), HasSubstr("not valid JSON"));
}

// Operators' removals: kept in removed.json, refused when malformed or when their run is gone.
TEST(StateStoreTest, OperatorRemovalsAreKeptAndAStrayFileIsRefused) {
  testing_dir dir;
  const std::filesystem::path state = dir.path() / "state";
  {
    auto store = StateStore::Open(state, common::Env::Default());
    ASSERT_TRUE(store.ok()) << store.status();
    ASSERT_TRUE(store->AddOperatorRemoval("c2", "removed from the run by operator ops: x").ok());
    EXPECT_EQ(store->operator_removals().at("c2"), "removed from the run by operator ops: x");
  }
  // No ledger.json: the removals belong to a run that is gone.
  auto reopened = StateStore::Open(state, common::Env::Default());
  EXPECT_TRUE(absl::IsFailedPrecondition(reopened.status())) << reopened.status();
  EXPECT_THAT(reopened.status().message(), HasSubstr("removed.json but no ledger.json"));
  std::ofstream(state / "removed.json") << "{\"c2\": 7}";
  reopened = StateStore::Open(state, common::Env::Default());
  EXPECT_TRUE(absl::IsDataLoss(reopened.status())) << reopened.status();
}

}  // namespace
}  // namespace fedlora::server

namespace fedlora::server {
namespace {

// Regressions: a symlinked metrics.jsonl was read and its target's contents copied into the new
// file; a symlinked export/ was followed, and a restart plus SIGUSR1 deleted a file in the link's
// target. Each entry of the state directory that is a link is refused at open, naming it and
// where it points, and the link's target is left as it was.
TEST(StateStoreTest, RefusesLinksInTheStateDirectoryNamingThem) {
  for (const std::string entry :
       {"ledger.json", "metrics.jsonl", "removed.json", "blobs", "incoming", "export"}) {
    testing_dir dir;
    const std::filesystem::path elsewhere = dir.path() / "elsewhere", state = dir.path() / "state";
    std::filesystem::create_directories(elsewhere);
    std::filesystem::create_directories(state);
    ASSERT_TRUE(common::WriteFileAtomically(elsewhere / "keep", "someone else's").ok());
    const bool is_dir = !entry.ends_with(".json") && !entry.ends_with(".jsonl");
    std::filesystem::create_symlink(is_dir ? elsewhere : elsewhere / "keep", state / entry);
    const auto store = StateStore::Open(state, common::Env::Default());
    ASSERT_FALSE(store.ok()) << entry;
    EXPECT_THAT(store.status().message(), HasSubstr(entry + " is a symbolic link (to "));
    EXPECT_EQ(*common::ReadFileToString(elsewhere / "keep"), "someone else's") << entry;
  }
}

// A blob that is a link is neither sent nor decoded: the file it points to might be anyone's.
TEST(StateStoreTest, ABlobThatIsALinkIsNotRead) {
  testing_dir dir;
  auto store = StateStore::Open(dir.path() / "state", common::Env::Default());
  ASSERT_TRUE(store.ok()) << store.status();
  const std::string sha = common::Sha256Hex("not a blob");
  ASSERT_TRUE(common::WriteFileAtomically(dir.path() / "secret", "not a blob").ok());
  std::filesystem::create_symlink(dir.path() / "secret", dir.path() / "state" / "blobs" / sha);
  EXPECT_FALSE(store->ReadBlob(sha, 0, 100).ok());
  const auto mapped = store->MapBlob(sha);
  ASSERT_FALSE(mapped.ok());
  EXPECT_THAT(mapped.status().message(), HasSubstr("is a symbolic link"));
}

}  // namespace
}  // namespace fedlora::server
