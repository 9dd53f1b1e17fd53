// The follow-up (server/follow_up.h) runs beside the rounds: while an evaluation is in progress —
// held here by a stand-in for the base model that waits until the test lets it go — a client's
// heartbeat and an operator's status are answered, the status says what the follow-up is doing,
// and the next round is trained and committed; once the evaluation ends, every version gets its
// metrics line with the score, in order.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <future>

#include "absl/synchronization/notification.h"
#include "tests/scratch_dir.h"
#include "tests/server/engine_harness.h"

namespace fedlora::testing {
namespace {

using ::testing::HasSubstr;

// Scores each version `100 + version`; the first evaluation waits for `release`.
class HeldEvaluator final : public server::Evaluator {
 public:
  HeldEvaluator(absl::Notification* started, absl::Notification* release)
      : started_(started), release_(release) {}
  absl::StatusOr<std::optional<Scores>> Evaluate(const server::Ledger&, const server::StateStore&,
                                                 int64_t version, const Adapter&) override {
    if (!started_->HasBeenNotified()) started_->Notify();
    release_->WaitForNotification();
    return Scores{100.0 + static_cast<double>(version), std::nullopt, {}};
  }
  absl::StatusOr<common::LlamaWeights> Merged(const server::Ledger&, const server::StateStore&,
                                              int64_t, const Adapter&) override {
    return absl::UnimplementedError("no base model in this test");
  }

 private:
  absl::Notification* started_;
  absl::Notification* release_;
};

// Runs `call` on another thread; fails the test instead of hanging if it does not return.
template <typename Fn>
auto Answered(Fn call) {
  auto future = std::async(std::launch::async, call);
  EXPECT_EQ(future.wait_for(std::chrono::seconds(60)), std::future_status::ready)
      << "the call waited for the evaluation";
  return future.get();
}

TEST(FollowUpTest, HeartbeatsStatusAndRoundsGoOnWhileAnEvaluationRuns) {
  ScratchDir dir;
  TestEnv env;
  server::ServerOptions o = TestOptions(dir.path() / "state", "fedit");
  o.rounds = 3;
  Harness h(o, &env);
  absl::Notification started, release;
  // Let the evaluation go however the test ends, or the engine's end would wait for it.
  struct Release {
    absl::Notification* n;
    ~Release() {
      if (!n->HasBeenNotified()) n->Notify();
    }
  } guard{&release};
  ASSERT_TRUE(h.Start(std::make_unique<HeldEvaluator>(&started, &release), /*wait=*/false).ok());
  for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.Join(id).ok());
  for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.Step(id).ok()) << id;  // round 1
  started.WaitForNotification();  // version 1 is being evaluated, and stays so

  const v1::StatusResponse status = Answered([&] { return h.engine().GetStatus(); });
  EXPECT_EQ(status.follow_up(), "evaluating version 1");
  EXPECT_EQ(status.state_version(), 1);
  EXPECT_EQ(status.round(), 2);
  v1::HeartbeatRequest beat;
  beat.set_round(2);
  EXPECT_TRUE(Answered([&] { return h.engine().Heartbeat("c1", beat); }).still_wanted());
  for (const char* id : {"c1", "c2", "c3"})  // round 2, trained and committed meanwhile
    EXPECT_TRUE(Answered([&] { return h.Step(id); }).ok()) << id;
  EXPECT_EQ(LedgerVersions(dir.path() / "state"), std::vector<int64_t>({0, 1, 2}));
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "state" / "metrics.jsonl"));

  release.Notify();
  h.engine().WaitForFollowUp();
  const auto lines = ReadJsonLines(dir.path() / "state" / "metrics.jsonl");
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["round"], 1);
  EXPECT_EQ(lines[0]["eval_loss"], 101.0);
  EXPECT_EQ(lines[1]["eval_loss"], 102.0);
  EXPECT_EQ(h.engine().GetStatus().follow_up(), "");
}

// An operator's export (SIGUSR1) of version 1 is still being written when the last round commits:
// it is not the run's final export, which follows it with version 2.
TEST(FollowUpTest, AnExportInProgressWhenTheRunEndsIsFollowedByTheFinalOne) {
  ScratchDir dir;
  TestEnv env;
  Harness h(TestOptions(dir.path() / "state", "fedit"), &env);  // two rounds
  ASSERT_TRUE(h.Start(nullptr, /*wait=*/false).ok());
  for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.Join(id).ok());
  for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.Step(id).ok()) << id;  // round 1
  h.engine().WaitForFollowUp();
  absl::Notification reached, release;
  env.HoldPath("version.json", &reached, &release);
  ASSERT_TRUE(h.engine().ExportNow().ok());
  reached.WaitForNotification();  // version 1's export is writing its last file
  for (const char* id : {"c1", "c2", "c3"})
    ASSERT_TRUE(h.Step(id).ok()) << id;  // round 2, the last
  release.Notify();
  h.engine().WaitForFollowUp();
  EXPECT_TRUE(h.engine().done());
  const auto version = ReadJson(dir.path() / "state" / "export" / "version.json");
  EXPECT_EQ(version["version"], 2);
}

// A run that ends before its first round commits (every client left) is done, with nothing to
// evaluate or export: version 0 is no result, and FLoRA's has no delta to stack.
class EndsBeforeTheFirstRound : public ::testing::TestWithParam<std::string> {};

TEST_P(EndsBeforeTheFirstRound, IsDoneWithNoExport) {
  ScratchDir dir;
  TestEnv env;
  Harness h(TestOptions(dir.path() / "state", GetParam()), &env);
  ASSERT_TRUE(h.Start().ok());
  for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.Join(id).ok());
  v1::LeaveRequest leave;
  leave.set_round(1);
  leave.set_reason("leaving");
  for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.engine().Leave(id, leave).ok()) << id;
  for (int i = 0; i < 5 && !h.engine().done(); ++i) {
    env.Advance(std::chrono::seconds(10));
    h.Tick();
  }
  EXPECT_TRUE(h.engine().done());
  EXPECT_TRUE(h.engine().failed().ok()) << h.engine().failed();
  EXPECT_EQ(LedgerVersions(dir.path() / "state"), std::vector<int64_t>({0}));
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "state" / "export"));
}

INSTANTIATE_TEST_SUITE_P(Methods, EndsBeforeTheFirstRound,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb"));

}  // namespace
}  // namespace fedlora::testing
