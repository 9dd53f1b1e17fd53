// The round engine's state machine, transition by transition, with the test Env's clock and no
// processes or sleeps: every way a round can close or be retried, late and declined clients, a
// member lost mid-upload, and a restart in each phase. What the engine commits is checked against
// the FedIT formula computed here from the clients' updates.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cmath>
#include <map>
#include <regex>
#include <sstream>
#include <thread>

#include "common/tensor/peft.h"
#include "server/cohort.h"
#include "server/errors.h"
#include "server/round/engine.h"
#include "tests/server/round_engine_fixture.h"
#include "tests/test_util.h"

namespace fedlora::testing {
namespace {

namespace fs = std::filesystem;
using common::StrCat;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

TEST_F(RoundEngineTest, WaitsForMinClientsThenEveryAnswerClosesTheRound) {
  ASSERT_TRUE(h_.Join("c1").ok());
  auto task = h_.Task("c1");
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::WAIT);
  EXPECT_THAT(task->note(), HasSubstr("waiting for 3 clients to join, 1 joined"));
  ASSERT_TRUE(h_.Join("c2").ok());
  ASSERT_TRUE(h_.Join("c3").ok());
  Train("c1");
  Train("c2");
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));  // c3 has not answered
  Train("c3");
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c2", "c3"}, 1);
  const auto metrics = Metrics();
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["version"], 1);
  EXPECT_EQ(metrics[0]["arrived"], nlohmann::json({"c1", "c2", "c3"}));
  EXPECT_EQ(metrics[0]["examples"]["c2"], 30);
  // Round 2 is open: the same clients train from version 1, and it ends the run with an export.
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  EXPECT_TRUE(h_.engine().done());
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2}));
  ExpectFedItMean({"c1", "c2", "c3"}, 2);
  EXPECT_EQ(ReadJson(state() / "export" / "version.json")["version"], 2);
  auto exported = common::ReadPeftAdapter(state() / "export" / "global");
  ASSERT_TRUE(exported.ok()) << exported.status();
  EXPECT_EQ(exported->A(0), Global().A(0));
  auto done = h_.Task("c1");
  ASSERT_TRUE(done.ok());
  EXPECT_EQ(done->kind(), v1::Task::DONE);
  EXPECT_EQ(done->state_version(), 2);
}

TEST_F(RoundEngineTest, ALongPollEndsBeforeItsClientCouldCountAsSilent) {
  ASSERT_TRUE(h_.Join("c1").ok());
  v1::GetTaskRequest poll;
  poll.set_max_wait_ms(60000);  // asks for a minute; the client timeout is 20 s
  std::optional<absl::StatusOr<v1::Task>> answer;
  h_.engine().GetTask("c1", poll, [&](absl::StatusOr<v1::Task> t) { answer = std::move(t); });
  env_.Advance(std::chrono::milliseconds(9900));
  h_.Tick();
  EXPECT_FALSE(answer.has_value());
  env_.Advance(std::chrono::milliseconds(100));
  h_.Tick();
  ASSERT_TRUE(answer.has_value());  // after half the timeout: the client polls again in time
  ASSERT_TRUE(answer->ok());
  EXPECT_EQ((*answer)->kind(), v1::Task::WAIT);
}

// Long polls are answered the moment their task changes — without waiting for a tick — and not
// before: another client's upload that does not close the round leaves them waiting.
TEST_F(RoundEngineTest, ALongPollIsAnsweredWhenItsTaskChangesAndOnlyThen) {
  using Answer = std::optional<absl::StatusOr<v1::Task>>;
  auto poll = [&](const std::string& id, Answer* answer) {
    v1::GetTaskRequest request;
    request.set_max_wait_ms(8000);
    answer->reset();
    h_.engine().GetTask(id, request, [answer](absl::StatusOr<v1::Task> t) { *answer = t; });
  };
  Answer a1, a2;
  ASSERT_TRUE(h_.Join("c1").ok());
  ASSERT_TRUE(h_.Join("c2").ok());
  poll("c1", &a1);
  poll("c2", &a2);
  EXPECT_FALSE(a1.has_value());
  ASSERT_TRUE(h_.Join("c3").ok());  // the third join opens round 1
  ASSERT_TRUE(a1.has_value() && a1->ok() && a2.has_value() && a2->ok());
  EXPECT_EQ((*a1)->kind(), v1::Task::TRAIN);
  EXPECT_EQ((*a2)->kind(), v1::Task::TRAIN);

  const v1::Task task = **a1;
  ASSERT_TRUE(h_.Send("c1", task, h_.Encode(*h_.MakeUpdate("c1", task))).ok());
  poll("c1", &a1);  // accepted: waits for round 1 to close
  Train("c2");
  env_.Advance(std::chrono::milliseconds(7900));
  h_.Tick();
  EXPECT_FALSE(a1.has_value()) << "answered after another client's upload";
  Train("c3");  // closes round 1
  ASSERT_TRUE(a1.has_value() && a1->ok());
  EXPECT_EQ((*a1)->kind(), v1::Task::TRAIN);
  EXPECT_EQ((*a1)->round(), 2);
}

TEST_F(RoundEngineTest, DeadlineWithQuorumClosesWithoutTheMissingMember) {
  h_.Stop();
  h_.options().quorum = 0.5;            // ⌈0.5·3⌉ = 2
  h_.options().client_timeout_s = 100;  // nobody counts as silent: only the deadline closes
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  Train("c1");
  Train("c3");
  env_.Advance(std::chrono::seconds(59));
  h_.Tick();
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));  // the deadline is 60 s
  v1::HeartbeatRequest beat;
  beat.set_round(1);
  EXPECT_TRUE(h_.engine().Heartbeat("c2", beat).still_wanted());
  env_.Advance(std::chrono::seconds(1));
  h_.Tick();
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c3"}, 1);
  EXPECT_EQ(Metrics()[0]["dropped"], nlohmann::json({"c2"}));
  EXPECT_FALSE(h_.engine().Heartbeat("c2", beat).still_wanted());  // round 1 is over
}

TEST_F(RoundEngineTest, DeadlineWithoutQuorumRetriesTheRoundAfterABackoff) {
  JoinAll();  // quorum 1: every member must deliver
  Train("c1");
  v1::HeartbeatRequest beat;
  beat.set_round(1);
  for (int t = 0; t < 4; ++t) {  // c2 and c3 are alive, only slow
    env_.Advance(std::chrono::seconds(15));
    h_.engine().Heartbeat("c2", beat);
    h_.engine().Heartbeat("c3", beat);
    h_.Tick();
  }
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));  // no version without quorum
  EXPECT_FALSE(fs::exists(state() / "metrics.jsonl"));
  // The retry waits 0.5 s: nobody is asked to train meanwhile.
  auto task = h_.Task("c1");
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::WAIT);
  EXPECT_THAT(task->note(), HasSubstr("round 1 is retried (attempt 2) after 0.5 s"));
  EXPECT_THAT(h_.engine().GetStatus().waiting_for(), HasSubstr("round 1 is retried"));
  env_.Advance(std::chrono::milliseconds(500));
  h_.Tick();
  // Attempt 2 of round 1: c1's update of attempt 1 is forgotten, so it trains again.
  task = h_.Task("c1");
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::TRAIN);
  EXPECT_EQ(task->round(), 1);
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  EXPECT_EQ(Metrics()[0]["attempt"], 2);
}

// The lost client of a docker-compose run (issue: one of three containers killed for good). With a
// quorum that two of three meet, the run finishes with the two live clients; the dead one is left
// out of later cohorts.
TEST_F(RoundEngineTest, ALostClientIsLeftOutAndTheRunFinishesWhenTheQuorumAllows) {
  h_.Stop();
  h_.options().quorum = 0.67;  // of 3 members: ⌈2.01 − 0.05⌉ = 2
  h_.options().min_clients = 2;
  h_.options().rounds = 3;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();  // round 1 starts with c1, c2 at c2's join
  Train("c1");
  Train("c2");
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  Train("c1");
  Train("c2");                                   // c3, in round 2's cohort, is dead from here on
  Pass(std::chrono::seconds(20), {"c1", "c2"});  // c3 silent past the timeout: the round closes
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2}));
  EXPECT_EQ(Metrics()[1]["dropped"], nlohmann::json({"c3"}));
  Train("c1");
  Train("c2");  // round 3's cohort is the live c1, c2: the round closes at once
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2, 3}));
  EXPECT_EQ(Metrics()[2]["cohort"], nlohmann::json({"c1", "c2"}));
  EXPECT_TRUE(h_.engine().done());
}

// The same with a quorum the live clients cannot meet: the run waits, saying for what, and
// retrains nobody until the lost client is back.
TEST_F(RoundEngineTest, ARunThatCannotReachQuorumWaitsWithoutRetrainingAnyone) {
  JoinAll();  // min_clients 3, quorum 1
  Train("c1");
  Train("c2");
  Pass(std::chrono::seconds(20), {"c1", "c2"});  // c3 silent: the round is retried...
  v1::HeartbeatRequest beat;
  const int64_t writes = env_.writes();
  for (int t = 0; t < 600; ++t) {  // ...and ten minutes pass with c1, c2 polling
    env_.Advance(std::chrono::seconds(1));
    ASSERT_EQ(h_.Task("c1")->kind(), v1::Task::WAIT);
    ASSERT_EQ(h_.Task("c2")->kind(), v1::Task::WAIT);
    h_.Tick();
  }
  EXPECT_EQ(env_.writes(), writes) << "nobody uploaded: nobody was asked to train";
  const std::string waiting = h_.engine().GetStatus().waiting_for();
  EXPECT_THAT(waiting, HasSubstr("round 1 waits for 3 live clients (2 alive; silent past the 20 s "
                                 "timeout: c3)"));
  EXPECT_THAT(h_.Task("c1")->note(), HasSubstr("waits for 3 live clients"));
  ASSERT_TRUE(h_.Join("c3").ok());  // back: round 1 starts again with all three
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
}

TEST_F(RoundEngineTest, SilentMembersCloseTheRoundBeforeItsDeadline) {
  h_.Stop();
  h_.options().quorum = 0.5;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  env_.Advance(std::chrono::seconds(15));
  Train("c1");
  Train("c2");
  env_.Advance(std::chrono::seconds(4));  // c3 silent for 19 s of its 20
  h_.Tick();
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));
  env_.Advance(std::chrono::seconds(1));
  h_.Tick();
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  EXPECT_EQ(Metrics()[0]["dropped"], nlohmann::json({"c3"}));
}

TEST_F(RoundEngineTest, LateUpdateIsRefusedAndRecordedInTheNextRound) {
  h_.Stop();
  h_.options().quorum = 0.5;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  auto task = h_.Task("c2");  // c2 takes its round-1 task but is slow
  ASSERT_TRUE(task.ok());
  Train("c1");
  Train("c3");
  Pass(std::chrono::seconds(60), {"c1", "c2", "c3"});  // the deadline closes round 1
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  auto late = h_.Send("c2", *task, h_.Encode(*h_.MakeUpdate("c2", *task)));
  ASSERT_FALSE(late.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(late.status()));
  ASSERT_TRUE(server::DetailOf(late.status()).has_value());
  EXPECT_EQ(server::DetailOf(late.status())->reason(), v1::ErrorDetail::LATE);
  EXPECT_THAT(late.status().message(),
              HasSubstr("round 1 closed before this update arrived (late); round 2 is open"));
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2}));
  EXPECT_EQ(Metrics()[1]["late"], nlohmann::json({{"c2", 1}}));
  ExpectFedItMean({"c1", "c2", "c3"}, 2);  // the late update reached no aggregate
}

// Regressions of poisoning with finite values: a scaling other than the task's (1e300 made the
// global lora_B +inf), an update claiming more examples than its client joined with, a join with
// INT64_MAX examples. Each is refused with what was expected; the round is the honest mean.
TEST_F(RoundEngineTest, RegressionUpdatesCannotScaleTheirOwnWeight) {
  h_.Stop();
  h_.options().max_rejections = 0;  // c2 is refused five times here, and not removed
  ASSERT_TRUE(h_.Start().ok());
  EXPECT_THAT(h_.Join("c9", INT64_MAX).message(),
              HasSubstr("num_examples is 9223372036854775807; the run admits at most 1000000000 "
                        "per client (--max-client-examples)"));
  JoinAll();
  auto task = h_.Task("c2");
  ASSERT_TRUE(task.ok());
  const Adapter honest = *h_.MakeUpdate("c2", *task);
  auto rescaled = [&](double scaling) {
    std::vector<common::ModuleShape> shapes;
    for (const common::LoraModule& m : honest.modules()) {
      shapes.push_back(m);
      shapes.back().scaling = scaling;
    }
    Adapter a = *Adapter::Create(shapes);
    std::copy(honest.values().begin(), honest.values().end(), a.values().begin());
    return a;
  };
  const double task_scaling = honest.module(0).scaling;
  auto refused = h_.Send("c2", *task, h_.Encode(rescaled(1000 * task_scaling)));
  EXPECT_EQ(server::DetailOf(refused.status())->reason(), v1::ErrorDetail::REJECTED);
  EXPECT_THAT(refused.status().message(),
              HasSubstr(StrCat("scaling ", 1000 * task_scaling, ", the task's is ", task_scaling)));
  // Past any scaling fedlora admits (9e9… written over the value on the wire): refused as the
  // adapter is decoded.
  std::string bytes = h_.Encode(honest);
  const std::string key = honest.module(0).name + "\\\":";  // in the metadata's JSON string
  size_t pos = bytes.find(key);
  ASSERT_NE(pos, std::string::npos);
  pos += key.size();
  const size_t end = bytes.find_first_of(",}\\", pos);
  ASSERT_GE(end - pos, 3u);
  bytes.replace(pos, end - pos, "9e" + std::string(end - pos - 2, '9'));  // same length
  refused = h_.Send("c2", *task, bytes);
  EXPECT_THAT(refused.status().message(), HasSubstr("is outside [-10000, 10000]"));
  refused = h_.Send("c2", *task, "");  // regression: said "exceeds the limit"
  EXPECT_THAT(refused.status().message(),
              HasSubstr("update of total size 0; an update has at least one byte"));
  refused = h_.Send("c2", *task, h_.Encode(honest), -1, Harness::Examples("c2") + 1);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("the update claims 31 examples, more than the 30 c2 joined with"));
  // Regression (engine fuzzer): a claim of INT64_MAX was converted to a double and back, past
  // int64's range, before it was compared with the join's.
  refused = h_.Send("c2", *task, h_.Encode(honest), -1, INT64_MAX);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("the update claims 9223372036854775807 examples, more than the 30 c2"));
  // The round waits for a rejected member (it may retry); its honest retry is taken, and the round
  // is the honest updates' mean at their joined weights.
  ASSERT_TRUE(h_.Send("c2", *task, h_.Encode(honest)).ok());
  Train("c1");
  Train("c3");
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c2", "c3"}, 1);
  EXPECT_EQ(Metrics()[0]["weight_share"],
            nlohmann::json({{"c1", 20.0 / 90}, {"c2", 30.0 / 90}, {"c3", 40.0 / 90}}));
}

// A client the run removed stays removed when the coordinator restarts, and the restarted run
// does not wait for it to join again (regression: it waited for --min-clients, the removed one
// included); with --max-rejections 0 it may take part again.
TEST_F(RoundEngineTest, ARemovedClientStaysRemovedAcrossARestart) {
  h_.Stop();
  h_.options().max_rejections = 1;
  h_.options().rounds = 3;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  const auto task = h_.Task("c2");
  ASSERT_TRUE(task.ok());
  const auto refused = h_.Send("c2", *task, "");  // no bytes: refused at once
  EXPECT_EQ(server::DetailOf(refused.status())->reason(), v1::ErrorDetail::REMOVED);
  EXPECT_THAT(refused.status().message(),
              HasSubstr("c2 was removed from the run after 1 rounds with a rejected update "
                        "(--max-rejections; the last: update of total size 0"));
  Train("c1");
  Train("c3");  // the round closes with the two left
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  EXPECT_EQ(Metrics()[0]["removed"].size(), 1u);

  h_.Stop();
  ASSERT_TRUE(h_.Start().ok());
  const absl::Status rejoin = h_.Join("c2");
  EXPECT_EQ(server::DetailOf(rejoin)->reason(), v1::ErrorDetail::REMOVED) << rejoin;
  ASSERT_TRUE(h_.Join("c1").ok());
  ASSERT_TRUE(h_.Join("c3").ok());
  const v1::StatusResponse status = h_.engine().GetStatus();
  ASSERT_EQ(status.clients_size(), 3);  // the two joined, and the removed one
  EXPECT_EQ(status.clients(2).id(), "c2");
  EXPECT_THAT(status.clients(2).removed(), HasSubstr("after 1 rounds with a rejected update"));
  Train("c1");
  Train("c3");
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2}));

  h_.Stop();
  h_.options().max_rejections = 0;
  ASSERT_TRUE(h_.Start().ok());
  EXPECT_TRUE(h_.Join("c2").ok());
}

// A round retried without quorum is one round: a client that sends junk in each of its attempts is
// struck once (regression: once per attempt, which removed it at --max-rejections 2 here).
TEST_F(RoundEngineTest, JunkInEveryAttemptOfARoundIsOneStrike) {
  h_.Stop();
  h_.options().max_rejections = 2;
  h_.options().round_deadline_s = 5;  // quorum 1: the round is retried without c2
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  for (int attempt = 1; attempt <= 2; ++attempt) {
    const auto task = h_.Task("c2");
    ASSERT_TRUE(task.ok());
    ASSERT_EQ(task->kind(), v1::Task::TRAIN) << attempt;
    const auto refused = h_.Send("c2", *task, "");
    EXPECT_EQ(server::DetailOf(refused.status())->reason(), v1::ErrorDetail::REJECTED)
        << attempt << ": " << refused.status();
    Pass(std::chrono::seconds(7), {"c1", "c2", "c3"});  // the deadline passes; retried
  }
  const v1::StatusResponse status = h_.engine().GetStatus();
  ASSERT_EQ(status.clients_size(), 3);
  EXPECT_EQ(status.clients(1).id(), "c2");
  EXPECT_EQ(status.clients(1).rejected_updates(), 1);
  EXPECT_EQ(status.clients(1).removed(), "");
}

// An operator's removal drops the client's update even when it was accepted (the round is the
// formula's mean of the other two), is recorded with the round, and outlasts a restart, even one
// with --max-rejections 0 (which re-admits clients removed for rejected updates only). A paused
// engine opens no round until it resumes.
TEST_F(RoundEngineTest, AnOperatorsRemovalDropsAnAcceptedUpdateAndOutlastsRestarts) {
  h_.Stop();
  h_.options().rounds = 3;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  Train("c2");
  auto removed = h_.engine().Remove("c2", "ops", "its key leaked");
  ASSERT_TRUE(removed.ok()) << removed.status();
  EXPECT_TRUE(absl::IsFailedPrecondition(h_.engine().Remove("c2", "ops", "again").status()));
  Train("c1");
  Train("c3");
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c3"}, 1);
  const nlohmann::json line = Metrics()[0];
  EXPECT_EQ(line["arrived"], nlohmann::json({"c1", "c3"}));
  EXPECT_EQ(line["removed"]["c2"], "removed from the run by operator ops: its key leaked");

  ASSERT_TRUE(h_.engine().Pause(true, "ops").ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(h_.engine().Pause(true, "ops").status()));
  Train("c1");  // round 2 was open: it goes on and closes
  Train("c3");
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2}));
  h_.Tick();
  const auto waiting = h_.Task("c1");
  ASSERT_TRUE(waiting.ok());
  EXPECT_EQ(waiting->kind(), v1::Task::WAIT);
  EXPECT_THAT(h_.engine().GetStatus().waiting_for(), HasSubstr("paused by operator ops"));
  ASSERT_TRUE(h_.engine().Pause(false, "ops").ok());
  Train("c1");

  h_.Stop();
  h_.options().max_rejections = 0;
  ASSERT_TRUE(h_.Start().ok());
  const absl::Status rejoin = h_.Join("c2");
  EXPECT_EQ(server::DetailOf(rejoin)->reason(), v1::ErrorDetail::REMOVED) << rejoin;
  EXPECT_THAT(rejoin.message(), HasSubstr("by operator ops: its key leaked"));

  // Removed, then a restart before any round commits: still removed (removed.json).
  ASSERT_TRUE(h_.Join("c1").ok());
  ASSERT_TRUE(h_.Join("c3").ok());
  ASSERT_TRUE(h_.engine().Remove("c3", "ops", "gone rogue").ok());
  EXPECT_TRUE(absl::IsNotFound(h_.engine().Remove("c9", "ops", "never joined").status()));
  h_.Stop();
  ASSERT_TRUE(h_.Start().ok());
  EXPECT_EQ(server::DetailOf(h_.Join("c3"))->reason(), v1::ErrorDetail::REMOVED);
  EXPECT_EQ(server::DetailOf(h_.Join("c2"))->reason(), v1::ErrorDetail::REMOVED);
  // ... and the next round records it, which no round had.
  ASSERT_TRUE(h_.Join("c1").ok());
  Train("c1");
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2, 3}));
  EXPECT_EQ(Metrics().back()["removed"]["c3"], "removed from the run by operator ops: gone rogue");
}

// Eight clients, each on a thread of its own, and a thread ticking the engine, as gRPC's threads
// and the coordinator's ticker call it: polls, chunked uploads (verified outside the engine's
// lock), downloads and ticks interleave. Every round is the formula's mean of all eight. Under
// -DFEDLORA_SANITIZE=thread this is the engine's concurrency check.
TEST_F(RoundEngineTest, ClientsOnThreadsOfTheirOwnGetTheFormulasRounds) {
  h_.Stop();
  h_.options().min_clients = 8;
  h_.options().rounds = 3;
  h_.options().max_wait_ms = 0;
  ASSERT_TRUE(h_.Start().ok());
  std::vector<std::string> ids;
  for (int i = 1; i <= 8; ++i) ids.push_back("c" + std::to_string(i));
  std::atomic<bool> done{false};
  std::thread ticker([&] {
    while (!done) {
      h_.Tick();
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  });
  std::vector<std::thread> clients;
  std::atomic<int> failures{0};
  for (const std::string& id : ids) {
    clients.emplace_back([&, id] {
      if (!h_.Join(id).ok()) ++failures;
      for (int polls = 0; polls < 100000; ++polls) {
        auto step = h_.Step(id);
        if (step.ok() && *step == v1::Task::DONE) return;
        if (!step.ok() && !absl::IsFailedPrecondition(step.status())) ++failures;
        std::this_thread::sleep_for(std::chrono::microseconds(200));
      }
      ++failures;
    });
  }
  for (std::thread& t : clients) t.join();
  done = true;
  ticker.join();
  EXPECT_EQ(failures, 0);
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2, 3}));
  ExpectFedItMean(ids, 3);
}

// The lines logged (their text only) while it lives.
class LogCapture {
 public:
  LogCapture() : previous_(spdlog::default_logger()) {
    auto sink = std::make_shared<spdlog::sinks::ostream_sink_mt>(out_);
    sink->set_pattern("%v");
    spdlog::set_default_logger(std::make_shared<spdlog::logger>("capture", sink));
  }
  ~LogCapture() { spdlog::set_default_logger(previous_); }
  std::string text() const { return out_.str(); }

 private:
  std::ostringstream out_;
  std::shared_ptr<spdlog::logger> previous_;
};

// Regression: 5,000 joins from one client wrote 5,000 log lines. The same event is logged once per
// 10 s, with the count of what was held back.
TEST_F(RoundEngineTest, RegressionRepeatedJoinsAreLoggedOncePerWindow) {
  LogCapture log;
  for (int i = 0; i < 5000; ++i) ASSERT_TRUE(h_.Join("c1").ok());
  env_.Advance(std::chrono::seconds(11));
  ASSERT_TRUE(h_.Join("c1").ok());
  std::vector<std::string> lines;
  std::istringstream in(log.text());
  for (std::string line; std::getline(in, line);)
    if (line.find("c1 ") != std::string::npos) lines.push_back(line);
  ASSERT_EQ(lines.size(), 3u) << log.text().substr(0, 2000);
  EXPECT_THAT(lines[0], HasSubstr("c1 joined (20 examples)"));
  EXPECT_THAT(lines[1], HasSubstr("c1 re-joined (20 examples); 1 clients joined"));
  EXPECT_THAT(lines[2], HasSubstr("c1 re-joined (20 examples); 1 clients joined (repeated 4998 "
                                  "times in the last 11 s)"));
}

// A join starts a session; a later join with the same identity supersedes it: calls in the older
// session are refused (SUPERSEDED) and logged once per 10 s naming both peers, the newer session's
// and calls that name none (older clients, the status) go on.
TEST_F(RoundEngineTest, ALaterJoinSupersedesTheSession) {
  LogCapture log;
  auto first = h_.JoinFrom("c1", "ipv4:10.0.0.1:4000");
  auto second = h_.JoinFrom("c1", "ipv4:10.0.0.2:5000");
  ASSERT_TRUE(first.ok() && second.ok());
  EXPECT_EQ(first->session().size(), 32u);
  EXPECT_NE(first->session(), second->session());
  for (int i = 0; i < 3; ++i) {
    const absl::Status old = h_.engine().CheckSession("c1", first->session(), "ipv4:10.0.0.1:4000");
    EXPECT_TRUE(absl::IsPermissionDenied(old));
    EXPECT_EQ(server::DetailOf(old)->reason(), v1::ErrorDetail::SUPERSEDED);
    EXPECT_THAT(old.message(), HasSubstr("this session of c1 was superseded by a later join with "
                                         "the same identity from ipv4:10.0.0.2:5000"));
  }
  EXPECT_TRUE(h_.engine().CheckSession("c1", second->session(), "ipv4:10.0.0.2:5000").ok());
  EXPECT_TRUE(h_.engine().CheckSession("c1", "", "ipv4:10.0.0.3:6000").ok());
  EXPECT_TRUE(h_.engine().CheckSession("c2", "anything", "ipv4:10.0.0.3:6000").ok());  // not joined
  const std::string text = log.text();
  EXPECT_THAT(text, HasSubstr("c1 re-joined from ipv4:10.0.0.2:5000"));
  const std::string warning =
      "c1: a call from ipv4:10.0.0.1:4000 in a session that a later join from ipv4:10.0.0.2:5000 "
      "superseded: two processes use c1's certificate";
  ASSERT_NE(text.find(warning), std::string::npos) << text;
  EXPECT_EQ(text.find(warning, text.find(warning) + 1), std::string::npos);  // once in 10 s
}

// Regression: a coordinator whose cohort went silent, or whose disk is full, logged every 50 ms
// without end. Ticked every 50 ms for ten minutes of each, it logs any one kind of line (its text
// with the figures taken out) at most once per 10 s.
TEST_F(RoundEngineTest, RegressionStalledRoundsAndAFullDiskLogOncePerWindow) {
  LogCapture log;
  const auto ten_minutes = [&](const std::vector<std::string>& alive) {
    v1::HeartbeatRequest beat;
    for (int tick = 0; tick < 12000; ++tick) {
      env_.Advance(std::chrono::milliseconds(50));
      if (tick % 20 == 0)
        for (const std::string& id : alive) h_.engine().Heartbeat(id, beat);
      h_.Tick();
    }
  };
  JoinAll();
  Train("c1");
  ten_minutes({"c1"});  // c2 and c3 silent: the round cannot close, nor a new one start
  const std::string stalled = log.text();
  ASSERT_TRUE(h_.Join("c2").ok());
  ASSERT_TRUE(h_.Join("c3").ok());
  env_.FailWrite(0, ENOSPC, /*sticky=*/true);
  for (const char* id : {"c1", "c2", "c3"}) (void)h_.Step(id);
  ten_minutes({"c1", "c2", "c3"});  // every commit fails
  std::map<std::string, int> kinds;
  std::istringstream in(log.text());
  for (std::string line; std::getline(in, line);)
    ++kinds[std::regex_replace(line, std::regex("[0-9.]+"), "#")];
  for (const auto& [kind, n] : kinds) EXPECT_LE(n, 61) << kind;
  EXPECT_THAT(stalled, HasSubstr("waits for"));
  EXPECT_THAT(log.text(), HasSubstr("No space left on device"));
}

}  // namespace
}  // namespace fedlora::testing
