#include "server/round/secure_round.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/base/file_util.h"
#include "common/net/certs.h"
#include "tests/scratch_dir.h"

namespace fedlora::server {
namespace {

// A secure round of client-1..3 as the lifecycle drives it, with real keys: a step a client has
// taken is recognised when it is sent again (a retry after a lost answer), and only then.
TEST(SecureRoundTest, ARetriedStepIsRecognisedAndNothingElse) {
  testing::ScratchDir dir;
  ASSERT_TRUE(common::MakeRunCertificates(dir.path(), 3).ok());
  const std::string ca = *common::ReadFileToString(dir / "ca.pem");
  auto verifier =
      std::make_shared<const secagg::PeerVerifier>(*secagg::PeerVerifier::FromCaPem(ca));
  ServerOptions options;
  options.secure_aggregation = "secagg+";
  auto round = SecureRound::Open(options,
                                 {.name = "round 1",
                                  .run_id = "run",
                                  .round = 1,
                                  .cohort = {"client-1", "client-2", "client-3"},
                                  .length = 100,
                                  .change_clip = 1},
                                 verifier);
  ASSERT_TRUE(round.ok()) << round.status();
  SecureRound& r = **round;
  EXPECT_EQ(r.graph().neighbours, 2);
  EXPECT_EQ(r.graph().threshold, 2);
  std::vector<secagg::ClientSession> clients;
  std::vector<v1::SecAggRequest> keys;
  for (int k = 1; k <= 3; ++k) {
    const std::string name = "client-" + std::to_string(k);
    clients.push_back(*secagg::ClientSession::Create(
        r.config(), name, *secagg::Signer::FromPemFile((dir / (name + ".key")).string()),
        *secagg::PeerVerifier::FromCaPem(ca)));
    v1::SecAggRequest request;
    request.set_instance(r.config().instance());
    *request.mutable_keys() = *clients.back().AdvertiseKeys();
    keys.push_back(request);
    EXPECT_TRUE(r.Waits(name));
    EXPECT_FALSE(r.Took(name, request));
    const std::string pem = *common::ReadFileToString(dir / (name + ".pem"));
    ASSERT_TRUE(r.Receive(name, pem, request).ok());
    EXPECT_TRUE(r.Took(name, request));  // sent again: already taken
    EXPECT_FALSE(r.Waits(name));
  }
  v1::SecAggRequest elsewhere = keys[0];
  elsewhere.set_instance("another instance");
  EXPECT_FALSE(r.Took("client-1", elsewhere));
  v1::SecAggRequest shares;
  shares.set_instance(r.config().instance());
  shares.mutable_shares();
  EXPECT_FALSE(r.Took("client-1", shares));  // a step not taken yet
  const StateStore store = *StateStore::Open((dir / "state").string(), common::Env::Default());
  ASSERT_TRUE(r.Advance({}, store).ok());  // the keys step reads no masked input
  EXPECT_EQ(r.step(), SecureRound::Step::kShares);
  const std::optional<v1::SecAggStep> step = r.StepFor("client-1");
  ASSERT_TRUE(step.has_value());
  EXPECT_EQ(step->roster().keys_size(), 2);  // its two neighbours' keys, with certificates
  EXPECT_THAT(step->roster().keys(0).certificate(), ::testing::HasSubstr("BEGIN CERTIFICATE"));
}

}  // namespace
}  // namespace fedlora::server
