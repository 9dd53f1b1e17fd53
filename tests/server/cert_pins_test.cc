#include "server/cert_pins.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "server/errors.h"
#include "tests/process.h"
#include "tests/scratch_dir.h"

namespace fedlora::server {
namespace {

using ::testing::HasSubstr;

std::unique_ptr<CertPins> Open(const std::filesystem::path& dir) {
  auto pins = CertPins::Open(dir, common::Env::Default());
  EXPECT_TRUE(pins.ok()) << pins.status();
  return pins.ok() ? *std::move(pins) : nullptr;
}

TEST(CertPinsTest, AJoinPinsTheCertificateARestartKeepsItAndUnpinningAdmitsAnother) {
  testing::ScratchDir dir;
  auto pins = Open(dir.path());
  EXPECT_TRUE(pins->Check("site-a", "aaaa", /*join=*/false).ok());  // no pin, no join: nothing
  EXPECT_FALSE(std::filesystem::exists(dir / "pins.json"));
  ASSERT_TRUE(pins->Check("site-a", "aaaa", /*join=*/true).ok());
  EXPECT_TRUE(pins->Check("site-a", "aaaa", /*join=*/false).ok());
  pins = Open(dir.path());  // a restarted coordinator
  const absl::Status other = pins->Check("site-a", "bbbb", /*join=*/true);
  EXPECT_TRUE(absl::IsPermissionDenied(other)) << other;
  EXPECT_EQ(DetailOf(other)->reason(), v1::ErrorDetail::CERTIFICATE);
  EXPECT_THAT(other.message(), HasSubstr("presented certificate sha256:bbbb; it is pinned to "
                                         "sha256:aaaa"));
  EXPECT_THAT(other.message(), HasSubstr("fedlora-client --admin unpin --admin-client site-a`"));
  ASSERT_TRUE(pins->Unpin("site-a").ok());
  EXPECT_TRUE(absl::IsNotFound(pins->Unpin("site-a")));
  EXPECT_TRUE(pins->Check("site-a", "bbbb", /*join=*/true).ok());
  EXPECT_EQ(nlohmann::json::parse(testing::ReadText(dir / "pins.json")),
            nlohmann::json({{"site-a", "bbbb"}}));
}

TEST(CertPinsTest, AMalformedOrLinkedFileIsRefused) {
  testing::ScratchDir dir;
  std::ofstream(dir / "pins.json") << "{\"site-a\": 7}";
  auto pins = CertPins::Open(dir.path(), common::Env::Default());
  EXPECT_TRUE(absl::IsFailedPrecondition(pins.status())) << pins.status();
  std::filesystem::remove(dir / "pins.json");
  std::filesystem::create_symlink(dir / "elsewhere.json", dir / "pins.json");
  pins = CertPins::Open(dir.path(), common::Env::Default());
  EXPECT_FALSE(pins.ok());
  EXPECT_THAT(pins.status().message(), HasSubstr("symbolic link"));
}

}  // namespace
}  // namespace fedlora::server
