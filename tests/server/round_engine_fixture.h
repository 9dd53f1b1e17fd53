// The round engine's tests' fixture (tests/server/round_engine*_test.cc): a harness with three
// clients, and the FedIT formula computed from their updates to check what the engine committed.
#ifndef FEDLORA_TESTS_SERVER_ROUND_ENGINE_FIXTURE_H_
#define FEDLORA_TESTS_SERVER_ROUND_ENGINE_FIXTURE_H_

#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "tests/scratch_dir.h"
#include "tests/server/engine_harness.h"
#include "tests/test_util.h"

namespace fedlora::testing {

class RoundEngineTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(h_.Start().ok()); }

  std::filesystem::path state() const { return dir_ / "state"; }
  // metrics.jsonl once the follow-up has written what it can.
  std::vector<nlohmann::json> Metrics() {
    h_.engine().WaitForFollowUp();
    return ReadJsonLines(state() / "metrics.jsonl");
  }

  void JoinAll() {
    for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h_.Join(id).ok()) << id;
  }
  // Lets `d` pass a second at a time, the `alive` clients heartbeating as their nodes do.
  void Pass(std::chrono::seconds d, const std::vector<std::string>& alive) {
    v1::HeartbeatRequest beat;
    for (auto t = std::chrono::seconds(0); t < d; t += std::chrono::seconds(1)) {
      env_.Advance(std::chrono::seconds(1));
      for (const std::string& id : alive) h_.engine().Heartbeat(id, beat);
      h_.Tick();
    }
  }
  void Train(const std::string& id) {
    auto step = h_.Step(id);
    ASSERT_TRUE(step.ok()) << id << ": " << step.status();
    ASSERT_EQ(*step, v1::Task::TRAIN) << id;
  }
  // The global adapter of the latest version (fedit: Ā, B̄ at scaling 1).
  Adapter Global() {
    const nlohmann::json ledger = ReadJson(state() / "ledger.json");
    const std::string sha = ledger["versions"].back()["blobs"][0]["sha256"];
    auto bytes = common::ReadFileToString(state() / "blobs" / sha);
    return *common::DecodeAdapter(*bytes, sha);
  }
  // FedIT's Ā, B̄ of `ids`' round-`round` updates, from the update values, element by element.
  void ExpectFedItMean(const std::vector<std::string>& ids, int64_t round,
                       std::map<std::string, double> weights = {}) {
    const Adapter global = Global();
    v1::Task task;
    task.set_round(round);
    for (size_t i = 0; i < global.num_modules(); ++i) {
      MatrixD a = MatrixD::Zero(global.A(i).rows(), global.A(i).cols());
      MatrixD b = MatrixD::Zero(global.B(i).rows(), global.B(i).cols());
      double total = 0;
      for (const std::string& id : ids) {
        const Adapter u = *h_.MakeUpdate(id, task);
        const size_t j = *u.FindModule(global.module(i).name);
        const double w =
            weights.contains(id) ? weights[id] : static_cast<double>(Harness::Examples(id));
        for (Eigen::Index r = 0; r < a.rows(); ++r)
          for (Eigen::Index c = 0; c < a.cols(); ++c) a(r, c) += w * u.A(j)(r, c);
        for (Eigen::Index r = 0; r < b.rows(); ++r)
          for (Eigen::Index c = 0; c < b.cols(); ++c)
            b(r, c) += w * (kAlpha / kRank) * u.B(j)(r, c);
        total += w;
      }
      EXPECT_LT((global.A(i).cast<double>() - a / total).cwiseAbs().maxCoeff(), 1e-6);
      EXPECT_LT((global.B(i).cast<double>() - b / total).cwiseAbs().maxCoeff(), 1e-6);
    }
  }

  ScratchDir dir_;
  TestEnv env_;
  Harness h_{TestOptions(dir_ / "state", "fedit"), &env_};
};

}  // namespace fedlora::testing

#endif  // FEDLORA_TESTS_SERVER_ROUND_ENGINE_FIXTURE_H_
