// One hostile client of five, against the coordinator's defaults: its updates are refused or left
// out, it is removed after three, and the run ends where the four honest clients end without it.
#include <cmath>

#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

class AttackTest : public FederationTest, public ::testing::WithParamInterface<const char*> {
 protected:
  // Clients 1–4, and client-5 with `hostile` flags in the fault-hook build when they are given;
  // a coordinator with the defaults but for the fixture's (3 rounds, every client in round 1's
  // cohort). Returns the final global adapter's tensors.
  std::vector<float> Run(const std::string& tag, const std::vector<std::string>& hostile) {
    const CommandResult certs =
        RunProgram({"bash", kSource + "/deploy/make_certs.sh", (dir_ / "certs").string(), "5"});
    EXPECT_EQ(certs.exit_code, 0) << certs.output;
    const pid_t server = StartServer("fedit", tag, {"--min-clients", hostile.empty() ? "4" : "5"});
    EXPECT_FALSE(port_.empty()) << ReadText(dir_ / (tag + ".log"));
    std::vector<pid_t> clients;
    for (int i = 1; i <= 4; ++i) clients.push_back(StartClient(i, tag));
    const pid_t fifth = hostile.empty() ? 0 : StartClient(5, tag, hostile, "fedlora-client-faulty");
    for (int i = 0; i < 4; ++i) {
      EXPECT_EQ(Wait(clients[i], std::chrono::seconds(120)), 0)
          << ReadText(dir_ / (tag + "-client" + std::to_string(i + 1) + ".log"));
    }
    // A refused update is sent three times; then the node leaves the run and exits 1. A scaled
    // one is accepted and left out each round: removed after the third, the client exits 3
    // (kExitRefused), or 0 when the run's end reached it first.
    if (fifth != 0) {
      const int code = Wait(fifth, std::chrono::seconds(60));
      if (hostile[0] == "--testing-scale-update") {
        EXPECT_TRUE(code == 0 || code == client::kExitRefused) << code;
      } else {
        EXPECT_EQ(code, 1) << ReadText(dir_ / (tag + "-client5.log"));
      }
    }
    EXPECT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / (tag + ".log"));
    return Tensors(dir_ / (tag + "-out1") / "global" / "adapter_model.safetensors");
  }
};

TEST_P(AttackTest, OneHostileClientOfFiveChangesNothingWithTheDefaults) {
  std::vector<std::string> hostile;
  const std::string attack = GetParam();
  if (attack == "scaled") hostile = {"--testing-scale-update", "1000"};
  if (attack == "alpha") hostile = {"--testing-lora-alpha", "-1e30"};
  if (attack == "examples") hostile = {"--testing-claim-examples", "9223372036854775807"};
  const std::vector<float> honest = Run("honest", {});  // the four honest clients alone
  const std::vector<float> attacked = Run("attacked", hostile);
  ASSERT_EQ(attacked.size(), honest.size());
  ASSERT_FALSE(honest.empty());
  double diff = 0, norm = 0;
  for (size_t i = 0; i < honest.size(); ++i) {
    diff += std::pow(double{attacked[i]} - honest[i], 2);
    norm += std::pow(double{honest[i]}, 2);
  }
  // No update of the fifth client entered any aggregate: every round is the mean of the same four
  // honest updates, folded in the same order — the same bytes. (Against a run of five honest
  // clients the result differs by 30%: client 5 holds 31% of the examples.)
  EXPECT_EQ(std::sqrt(diff / norm), 0.0) << attack;
  // Every round went on without the hostile client's update.
  const auto metrics = Metrics("attacked");
  ASSERT_EQ(metrics.size(), 3u);
  for (const auto& line : metrics) EXPECT_EQ(line["arrived"].size(), 4u) << line.dump();
  if (attack == "scaled") {  // accepted, left out of each round's aggregate, named with its norm
    for (const auto& line : metrics) EXPECT_TRUE(line["norm_outliers"].contains("client-5"));
  } else {  // refused three times in round 1, then the node left
    EXPECT_EQ(metrics[0]["rejected"], nlohmann::json({{"client-5", 3}})) << metrics[0].dump();
    EXPECT_THAT(metrics[0]["declined"]["client-5"].get<std::string>(),
                HasSubstr("gave up after 3 failures in a row"));
  }
}

INSTANTIATE_TEST_SUITE_P(Attacks, AttackTest, ::testing::Values("scaled", "alpha", "examples"));

}  // namespace
}  // namespace fedlora
