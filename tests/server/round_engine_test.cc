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
#include "tests/server/engine_harness.h"
#include "tests/test_util.h"

namespace fedlora::testing {
namespace {

namespace fs = std::filesystem;
using common::StrCat;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;

class RoundEngineTest : public ::testing::Test {
 protected:
  void SetUp() override { ASSERT_TRUE(h_.Start().ok()); }

  fs::path state() const { return dir_ / "state"; }
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

TEST(LogLimiterTest, FirstThenOncePerWindowWithTheCount) {
  common::LogLimiter limiter(std::chrono::seconds(10));
  const auto t0 = common::LogLimiter::Clock::time_point();
  std::string suffix = "unset";
  EXPECT_TRUE(limiter.Allow("a", t0, &suffix));
  EXPECT_EQ(suffix, "");
  EXPECT_FALSE(limiter.Allow("a", t0 + std::chrono::seconds(3), &suffix));
  EXPECT_TRUE(limiter.Allow("b", t0 + std::chrono::seconds(3), &suffix));  // another event
  EXPECT_FALSE(limiter.Allow("a", t0 + std::chrono::seconds(9), &suffix));
  EXPECT_TRUE(limiter.Allow("a", t0 + std::chrono::seconds(10), &suffix));
  EXPECT_EQ(suffix, " (repeated 2 times in the last 10 s)");
  EXPECT_TRUE(limiter.Allow("a", t0 + std::chrono::seconds(25), &suffix));
  EXPECT_EQ(suffix, "");
}

// A client sends an update 1000× the others' norm: with --max-update-norm it is rejected, saying by
// how much, and the round is exactly the honest updates' mean.
TEST_F(RoundEngineTest, AnUpdatePastTheNormBoundIsRejected) {
  h_.Stop();
  h_.options().max_update_norm = 100;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  auto task = h_.Task("c2");
  ASSERT_TRUE(task.ok());
  Adapter big = *h_.MakeUpdate("c2", *task);
  double honest = 0;
  for (size_t i = 0; i < big.num_modules(); ++i) honest += std::pow(big.DeltaNorm(i), 2);
  ASSERT_LT(std::sqrt(honest), 100);  // the honest updates pass
  for (size_t i = 0; i < big.num_modules(); ++i) big.B(i) *= 1000.0f;
  auto refused = h_.Send("c2", *task, h_.Encode(big));
  EXPECT_EQ(server::DetailOf(refused.status())->reason(), v1::ErrorDetail::REJECTED);
  const std::string message(refused.status().message());
  const std::string said = "the update's norm ‖s·B·A‖_F = ";
  ASSERT_NE(message.find(said), std::string::npos) << message;
  EXPECT_NEAR(std::stod(message.substr(message.find(said) + said.size())), 1000 * std::sqrt(honest),
              1e-5 * 1000 * std::sqrt(honest));
  EXPECT_THAT(message, HasSubstr("exceeds the run's bound of 100 (--max-update-norm)"));
  // The round waits for a rejected member (it may retry); its honest retry is taken, and the round
  // is exactly the honest updates' mean: nothing of the rejected one reached it.
  ASSERT_TRUE(h_.Send("c2", *task, h_.Encode(*h_.MakeUpdate("c2", *task))).ok());
  Train("c1");
  Train("c3");
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c2", "c3"}, 1);
}

// One client among five sends an update 1000× the others' norm. With --max-update-norm-ratio 10 no
// absolute bound need be known: the update is taken at upload (an outlier only against the round),
// left out when the round closes, and the round is exactly the other four's weighted mean, element
// by element from their updates: FedIT's Ā and s·B̄, Fed-SB's s·R̄ on the frozen B and A.
class MedianNormBoundTest : public RoundEngineTest {
 protected:
  void RunRoundWithAnOutlier(common::Method method) {
    h_.Stop();
    h_.options().method = method;
    h_.options().min_clients = 5;
    h_.options().max_update_norm_ratio = 10;
    ASSERT_TRUE(h_.Start().ok());
    for (const char* id : {"c1", "c2", "c3", "c4", "c5"}) ASSERT_TRUE(h_.Join(id).ok());
    auto task = h_.Task("c4");
    ASSERT_TRUE(task.ok());
    Adapter outlier = *h_.MakeUpdate("c4", *task);
    double norm = 0;
    for (size_t i = 0; i < outlier.num_modules(); ++i) {
      (method == common::Method::kFedSb ? outlier.R(i) : outlier.B(i)) *= 1000.0f;
      norm += std::pow(outlier.DeltaNorm(i), 2);
    }
    ASSERT_TRUE(h_.Send("c4", *task, h_.Encode(outlier)).ok());  // taken, for now
    for (const char* id : {"c1", "c2", "c3", "c5"}) Train(id);
    ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
    EXPECT_EQ(Metrics()[0]["arrived"], nlohmann::json({"c1", "c2", "c3", "c5"}));
    EXPECT_EQ(Metrics()[0]["rejected"], nlohmann::json({"c4"}));
    EXPECT_THAT(Metrics()[0]["dropped"], IsEmpty());
    EXPECT_NEAR(Metrics()[0]["norm_outliers"]["c4"].get<double>(), std::sqrt(norm),
                1e-6 * std::sqrt(norm));
  }
};

TEST_F(MedianNormBoundTest, FedItLeavesTheOutlierOutAtTheClose) {
  RunRoundWithAnOutlier(common::Method::kFedIt);
  ExpectFedItMean({"c1", "c2", "c3", "c5"}, 1);
}

TEST_F(MedianNormBoundTest, FedSbLeavesTheOutlierOutAtTheClose) {
  RunRoundWithAnOutlier(common::Method::kFedSb);
  v1::Task task;
  task.set_round(1);
  const nlohmann::json ledger = ReadJson(state() / "ledger.json");  // R alone, on the frozen B, A
  const std::string sha = ledger["versions"].back()["blobs"][0]["sha256"];
  const Adapter global = *common::DecodeROnto(*common::ReadFileToString(state() / "blobs" / sha),
                                              sha, *h_.MakeUpdate("c1", task));
  for (size_t i = 0; i < global.num_modules(); ++i) {
    MatrixD r = MatrixD::Zero(kRank, kRank);
    double total = 0;
    for (const char* id : {"c1", "c2", "c3", "c5"}) {
      const Adapter u = *h_.MakeUpdate(id, task);
      const double w = static_cast<double>(Harness::Examples(id));
      for (Eigen::Index x = 0; x < kRank; ++x)
        for (Eigen::Index y = 0; y < kRank; ++y) r(x, y) += w * (kAlpha / kRank) * u.R(i)(x, y);
      total += w;
    }
    EXPECT_LT((global.R(i).cast<double>() - r / total).cwiseAbs().maxCoeff(), 1e-6);
  }
}

// Found by tests/fuzz/engine_fuzzer.cc: a first client whose module is narrower than fed-sb's rank
// (B is m×r with orthonormal columns) wrote past its matrices; names that are not UTF-8, and
// dimensions no model has, reached the state files and the allocator. Each is refused at join,
// with nothing written, and a well-formed client then starts the run.
TEST_F(RoundEngineTest, RegressionMalformedModulesAreRefusedAtJoin) {
  h_.Stop();
  h_.options().method = common::Method::kFedSb;
  h_.options().max_update_bytes = 262144;
  ASSERT_TRUE(h_.Start().ok());
  const auto refused = [&](Modules modules) {
    h_.set_modules(std::move(modules));
    const absl::Status st = h_.Join("c1");
    h_.set_modules(kModules);
    EXPECT_FALSE(fs::exists(state() / "ledger.json"));
    return std::string(st.message());
  };
  EXPECT_THAT(refused({{"model.layers.0.self_attn.q_proj", 2, 16}}),
              HasSubstr("rank 4 cannot exceed module model.layers.0.self_attn.q_proj's 16x2"));
  EXPECT_THAT(refused({{"model.ml\x94.q_proj", 12, 16}}),
              HasSubstr("a module name of 16 bytes is not UTF-8"));
  EXPECT_THAT(refused({{"model.q_proj", 12, 1 << 30}}),
              HasSubstr("is 1073741824x12; dimensions must be in [1, 4194304]"));
  EXPECT_THAT(refused({{"model.q_proj", 4096, 4096}, {"model.v_proj", 4096, 4096}}),
              HasSubstr("takes 262272 bytes, more than max_update_bytes (262144)"));
  JoinAll();
  EXPECT_TRUE(fs::exists(state() / "ledger.json"));
}

// FLoRA's heterogeneous setting: each client trains the rank --client-ranks gives it, an update
// of another rank is refused, and the round's delta is exactly Σ p_k s_k B_k A_k over the mix.
TEST(HeterogeneousRanksTest, FloraClientsTrainTheirOwnRanksAndTheDeltaIsExact) {
  ScratchDir dir;
  TestEnv env;
  server::ServerOptions o = TestOptions(dir.path() / "state", "flora");
  o.client_ranks = {{"c1", 2}, {"c3", 7}};
  Harness h(o, &env);
  ASSERT_TRUE(h.Start().ok());
  for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.Join(id).ok()) << id;
  std::map<std::string, v1::Task> tasks;
  for (const char* id : {"c1", "c2", "c3"}) tasks[id] = *h.Task(id);
  EXPECT_EQ(tasks["c1"].settings().rank(), 2);
  EXPECT_EQ(tasks["c2"].settings().rank(), kRank);
  EXPECT_EQ(tasks["c3"].settings().rank(), 7);
  // c1 at the run's rank instead of its own: refused, saying which shapes.
  v1::Task wrong = tasks["c1"];
  wrong.mutable_settings()->set_rank(kRank);
  auto refused = h.Send("c1", tasks["c1"], h.Encode(*h.MakeUpdate("c1", wrong)));
  ASSERT_FALSE(refused.ok());
  EXPECT_THAT(std::string(refused.status().message()),
              HasSubstr("lora_A has shape [4,12], task says [2,12]"));
  std::map<std::string, Adapter> updates;
  for (const char* id : {"c1", "c2", "c3"}) {
    updates[id] = *h.MakeUpdate(id, tasks[id]);
    ASSERT_TRUE(h.Send(id, tasks[id], h.Encode(updates[id])).ok()) << id;
  }
  const nlohmann::json ledger = ReadJson(dir.path() / "state" / "ledger.json");
  ASSERT_EQ(ledger["versions"].size(), 2u) << "the round did not close";
  const std::string sha = ledger["versions"][1]["blobs"][0]["sha256"];
  const Adapter delta =
      *common::DecodeAdapter(*common::ReadFileToString(dir.path() / "state" / "blobs" / sha), sha);
  const double total = Harness::Examples("c1") + Harness::Examples("c2") + Harness::Examples("c3");
  for (size_t i = 0; i < delta.num_modules(); ++i) {
    EXPECT_EQ(delta.module(i).rank, 2 + kRank + 7);
    const MatrixD got =
        delta.module(i).scaling * delta.B(i).cast<double>() * delta.A(i).cast<double>();
    MatrixD expected = MatrixD::Zero(got.rows(), got.cols());
    for (const auto& [id, u] : updates) {
      const size_t j = *u.FindModule(delta.module(i).name);
      expected += Harness::Examples(id) / total * u.module(j).scaling * u.B(j).cast<double>() *
                  u.A(j).cast<double>();
    }
    EXPECT_LT((got - expected).cwiseAbs().maxCoeff(), 1e-6) << delta.module(i).name;
  }
}

TEST(HeterogeneousRanksTest, OnlyFloraTakesThemAndOnlyForAllowedClients) {
  server::ServerOptions o = TestOptions("state", "fedit");
  o.client_ranks = {{"c1", 2}};
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("client_ranks needs method flora"));
  o.method = common::Method::kFlora;
  EXPECT_TRUE(o.Validate().ok()) << o.Validate();
  o.allowed_clients = {"c2"};
  o.client_ca = "ca.pem";
  o.insecure = false;
  o.tls_cert = "s.pem";
  o.tls_key = "s.key";
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("c1, which is not an allowed client"));
  o.client_ranks = {{"c2", 0}};
  EXPECT_THAT(std::string(o.Validate().message()), HasSubstr("c2's rank is 0"));
}

TEST(WeightCapTest, WaterFillingByHand) {
  // 20, 30, 40, 50 and one of 10^6 at a cap of 1/4: with the two largest capped, T = ¼·90 / (1 −
  // ½) = 45, between 40 and 50; weights 20, 30, 40, 45, 45 (total 180; 45/180 = ¼).
  EXPECT_DOUBLE_EQ(server::WeightCap({50, 20, 1'000'000, 40, 30}, 0.25), 45);
  // Nobody above the cap, or no cap: infinite.
  EXPECT_TRUE(std::isinf(server::WeightCap({10, 10, 10, 10}, 0.25)));
  EXPECT_TRUE(std::isinf(server::WeightCap({1, 1'000'000}, 1)));
  // A cap below 1/members: equal weights, the smallest count.
  EXPECT_DOUBLE_EQ(server::WeightCap({7, 9, 100}, 0.2), 7);
  // One capped: 10, 10, 10 and 100 at ½ → T = ½·30 / ½ = 30 ≥ 10.
  EXPECT_DOUBLE_EQ(server::WeightCap({10, 100, 10, 10}, 0.5), 30);
}

// One client among five claims 50,000 times the others' data (within --max-client-examples): with
// --max-client-weight 0.25 its share is a quarter, and the round is the FedIT mean with the
// hand-derived capped weights (WaterFillingByHand) — the cap, not the claim, decides.
TEST_F(RoundEngineTest, AClientsWeightIsCappedAtItsShare) {
  h_.Stop();
  h_.options().min_clients = 5;
  h_.options().max_client_weight = 0.25;
  ASSERT_TRUE(h_.Start().ok());
  for (const char* id : {"c1", "c2", "c3", "c4"}) ASSERT_TRUE(h_.Join(id).ok());
  ASSERT_TRUE(h_.Join("c9", 1'000'000).ok());  // honest ones: 20, 30, 40, 50 examples
  for (const char* id : {"c1", "c2", "c3", "c4"}) Train(id);
  auto task = h_.Task("c9");
  ASSERT_TRUE(task.ok());
  ASSERT_TRUE(h_.Send("c9", *task, h_.Encode(*h_.MakeUpdate("c9", *task)), -1, 1'000'000).ok());
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c2", "c3", "c4", "c9"}, 1, {{"c4", 45}, {"c9", 45}});
  EXPECT_DOUBLE_EQ(Metrics().back()["weight_share"]["c9"].get<double>(), 0.25);
}

TEST_F(RoundEngineTest, DeclinedMemberIsNotWaitedForAndLeavesLaterCohorts) {
  JoinAll();
  Train("c1");
  Train("c2");
  v1::LeaveRequest leave;
  leave.set_round(1);
  // Found by the engine fuzzer: a reason that is not UTF-8 reached the ledger's JSON writer and
  // threw out of the round's commit. It is refused, and the member is still waited for.
  leave.set_reason("\xbf");
  EXPECT_THAT(h_.engine().Leave("c3", leave).status().message(),
              HasSubstr("a leave reason of 1 bytes; expected up to 1024 bytes of UTF-8"));
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));
  leave.set_reason("privacy budget spent");
  ASSERT_TRUE(h_.engine().Leave("c3", leave).ok());
  // The round closed at once: everyone answered, and the declined member is not in the quorum.
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  EXPECT_EQ(Metrics()[0]["declined"], nlohmann::json({{"c3", "privacy budget spent"}}));
  EXPECT_THAT(Metrics()[0]["dropped"], IsEmpty());
  auto task = h_.Task("c3");
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::WAIT);
  EXPECT_THAT(task->note(), HasSubstr("not in round 2's cohort"));
  // Joining again brings it back, from the next cohort on.
  Train("c1");
  Train("c2");
  ASSERT_TRUE(h_.Join("c3").ok());
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2}));
}

TEST_F(RoundEngineTest, MemberLostMidUploadIsDroppedAndItsPartDeleted) {
  h_.Stop();
  h_.options().quorum = 0.5;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  auto task = h_.Task("c2");
  ASSERT_TRUE(task.ok());
  const std::string bytes = h_.Encode(*h_.MakeUpdate("c2", *task));
  ASSERT_GT(bytes.size(), 1024u);  // more than one chunk
  auto half = h_.Send("c2", *task, bytes, 1024);
  ASSERT_TRUE(half.ok()) << half.status();
  EXPECT_EQ(half->received(), 1024);
  EXPECT_FALSE(half->accepted());
  auto incoming = env_.ListDirectory(state() / "incoming");
  ASSERT_TRUE(incoming.ok());
  EXPECT_EQ(incoming->size(), 1u);
  Train("c1");
  Train("c3");
  Pass(std::chrono::seconds(20), {"c1", "c3"});  // c2 silent past its timeout
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  EXPECT_EQ(Metrics()[0]["dropped"], nlohmann::json({"c2"}));
  ExpectFedItMean({"c1", "c3"}, 1);
  incoming = env_.ListDirectory(state() / "incoming");
  ASSERT_TRUE(incoming.ok());
  EXPECT_THAT(*incoming, IsEmpty());
}

TEST_F(RoundEngineTest, RestartWhileWaitingForClientsKeepsTheRun) {
  ASSERT_TRUE(h_.Join("c1").ok());  // creates the run (version 0), waits for 3
  const nlohmann::json before = ReadJson(state() / "ledger.json");
  ASSERT_TRUE(h_.Start().ok());
  EXPECT_EQ(ReadJson(state() / "ledger.json"), before);
  JoinAll();
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  EXPECT_EQ(ReadJson(state() / "ledger.json")["run_id"], before["run_id"]);
}

TEST_F(RoundEngineTest, RestartMidRoundRedoesTheRoundWithTheSameResult) {
  JoinAll();
  Train("c1");
  Train("c2");
  ASSERT_TRUE(h_.Start().ok());  // c1's and c2's accepted updates are not in any version
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));
  auto task = h_.Task("c1");
  EXPECT_TRUE(absl::IsFailedPrecondition(task.status())) << "a restarted engine knows no client";
  ASSERT_TRUE(server::DetailOf(task.status()).has_value());
  EXPECT_EQ(server::DetailOf(task.status())->reason(), v1::ErrorDetail::NOT_JOINED);
  JoinAll();
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c2", "c3"}, 1);
  EXPECT_EQ(Metrics().size(), 1u);
}

TEST_F(RoundEngineTest, RestartAfterACommitWritesTheMissingMetricsLineFromTheLedger) {
  JoinAll();
  Train("c1");
  Train("c2");
  env_.FailPath("metrics.jsonl");
  Train("c3");  // round 1 is committed; its metrics line is not written
  ASSERT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ASSERT_FALSE(fs::exists(state() / "metrics.jsonl"));
  env_.Heal();
  ASSERT_TRUE(h_.Start().ok());  // the line comes from the ledger's record: no clients needed
  const auto metrics = Metrics();
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["version"], 1);
  EXPECT_EQ(metrics[0]["arrived"], nlohmann::json({"c1", "c2", "c3"}));
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  JoinAll();
  for (const char* id : {"c1", "c2", "c3"}) Train(id);  // round 2 goes on from version 1
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1, 2}));
  EXPECT_EQ(Metrics().size(), 2u);
}

TEST_F(RoundEngineTest, RestartWithClientLevelDpBeforeTheFirstRoundAccountsFromIt) {
  ASSERT_TRUE(h_.Join("c1").ok());  // the run (version 0) exists, without client-level DP
  EXPECT_FALSE(ReadJson(state() / "ledger.json").contains("client_dp"));
  h_.Stop();
  h_.options().dp_clip = 0.5;
  h_.options().dp_noise_multiplier = 1.0;
  ASSERT_TRUE(h_.Start().ok());
  EXPECT_EQ(ReadJson(state() / "ledger.json")["client_dp"]["clip"], 0.5);
  JoinAll();
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  const nlohmann::json dp = ReadJson(state() / "ledger.json")["client_dp"];
  ASSERT_EQ(dp["rounds"].size(), 1u);  // round 1 accounted: q = 3/3, sigma 1, one step
  EXPECT_EQ(dp["rounds"][0]["q"], 1.0);
  EXPECT_EQ(dp["rounds"][0]["sigma"], 1.0);
  EXPECT_GT(Metrics()[0]["client_dp"]["epsilon"].get<double>(), 0.0);
}

TEST_F(RoundEngineTest, RestartAfterTheLastRoundExportsAgainAndAnswersDone) {
  JoinAll();
  for (int round = 1; round <= 2; ++round)
    for (const char* id : {"c1", "c2", "c3"}) Train(id);
  ASSERT_TRUE(h_.engine().done());
  fs::remove_all(state() / "export");
  ASSERT_TRUE(h_.Start().ok());
  EXPECT_TRUE(h_.engine().done());
  EXPECT_EQ(ReadJson(state() / "export" / "version.json")["version"], 2);
  ASSERT_TRUE(h_.Join("c1").ok());
  auto task = h_.Task("c1", 1);
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::DONE);
  ASSERT_EQ(task->downloads_size(), 1);  // fedit: the final adapter
  EXPECT_EQ(task->downloads(0).version(), 2);
  EXPECT_EQ(Metrics().size(), 2u);
}

// The bug that shaped the round close: with the metrics line failing, the same round was closed
// again on every tick, and the ledger grew versions [0, 1, 2, 3, 4, 4, 4, ...].
TEST_F(RoundEngineTest, RegressionMetricsWriteFailureNeverCreatesASecondVersion) {
  JoinAll();
  Train("c1");
  Train("c2");
  env_.FailPath("metrics.jsonl");
  Train("c3");
  for (int i = 0; i < 200; ++i) {  // ten seconds of ticks with the metrics file unwritable
    env_.Advance(std::chrono::milliseconds(50));
    h_.Tick();
  }
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  EXPECT_FALSE(fs::exists(state() / "metrics.jsonl"));
  ExpectFedItMean({"c1", "c2", "c3"}, 1);
  // Round 2 is open from version 1 and serves version 1's blob.
  auto task = h_.Task("c1");
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::TRAIN);
  EXPECT_EQ(task->round(), 2);
  ASSERT_EQ(task->downloads_size(), 1);
  EXPECT_EQ(task->downloads(0).version(), 1);
  env_.Heal();
  env_.Advance(std::chrono::seconds(30));
  h_.Tick();
  const auto metrics = Metrics();
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["version"], 1);
  EXPECT_EQ(metrics[0]["arrived"], nlohmann::json({"c1", "c2", "c3"}));
}

TEST_F(RoundEngineTest, ACommitThatKeepsFailingStopsTheEngineWithWhatToFix) {
  h_.Stop();
  h_.options().give_up_after_s = 120;
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  Train("c1");
  Train("c2");
  env_.FailPath("ledger.json");  // the commit itself
  Train("c3");
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));
  auto task = h_.Task("c1");
  ASSERT_TRUE(task.ok());
  EXPECT_THAT(task->note(), HasSubstr("round 1 is closing; its commit is being retried"));
  for (int i = 0; i < 10 && h_.engine().failed().ok(); ++i) {
    env_.Advance(std::chrono::seconds(30));
    h_.Tick();
  }
  const absl::Status failed = h_.engine().failed();
  EXPECT_TRUE(absl::IsResourceExhausted(failed)) << failed;
  EXPECT_THAT(failed.message(), HasSubstr("committing round 1"));
  EXPECT_THAT(failed.message(), HasSubstr("is full: free space there"));
  EXPECT_THAT(failed.message(), HasSubstr("continues from the last committed round"));
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0}));
  // With space back, a restarted coordinator redoes round 1 to the same result.
  env_.Heal();
  ASSERT_TRUE(h_.Start().ok());
  JoinAll();
  for (const char* id : {"c1", "c2", "c3"}) Train(id);
  EXPECT_EQ(LedgerVersions(state()), std::vector<int64_t>({0, 1}));
  ExpectFedItMean({"c1", "c2", "c3"}, 1);
}

}  // namespace
}  // namespace fedlora::testing
