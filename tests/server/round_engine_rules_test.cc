// The round engine's rules about what an update may do, and its restarts and failures: norm bounds,
// FLoRA's heterogeneous ranks, weight caps, declined and lost members, a restart in each phase,
// failing writes, and a round's result the same bytes whatever order its updates arrive in.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <spdlog/sinks/ostream_sink.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <cmath>
#include <map>
#include <regex>
#include <set>
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
    EXPECT_EQ(Metrics()[0]["rejected"], nlohmann::json({{"c4", 1}}));
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

// A round's result is the same bytes whatever order its updates arrive in: they are folded in
// client order at the close. Built to show it: c1, c2, c3 (weights 20, 30, 40) put 2^56, 1 and
// −2^55 in one entry of A, so that the weighted terms are 1.25·2^60, 30 and −1.25·2^60, and in
// double 1.25·2^60 + 30 is 1.25·2^60 again (its spacing there is 256): summed as they arrive,
// c1, c3, c2 would give 30 and c1, c2, c3 nothing. In client order it is always nothing.
TEST_F(RoundEngineTest, UpdatesInAnyOrderOfArrivalGiveTheSameBytes) {
  std::set<std::string> blobs;
  for (const std::vector<std::string>& order :
       {std::vector<std::string>{"c1", "c3", "c2"}, {"c3", "c1", "c2"}, {"c2", "c3", "c1"}}) {
    ScratchDir dir;
    TestEnv env;
    Harness h{TestOptions(dir.path() / "state", "fedit"), &env};
    h.set_update_values([](const std::string& id, Adapter& u) {
      u.A(0)(0, 0) = id == "c1" ? 0x1p56f : id == "c2" ? 1.0f : -0x1p55f;
    });
    ASSERT_TRUE(h.Start().ok());
    for (const char* id : {"c1", "c2", "c3"}) ASSERT_TRUE(h.Join(id).ok());
    for (const std::string& id : order) ASSERT_TRUE(h.Step(id).ok()) << id;
    const nlohmann::json ledger = ReadJson(dir.path() / "state" / "ledger.json");
    ASSERT_EQ(ledger["versions"].size(), 2u);
    const std::string sha = ledger["versions"][1]["blobs"][0]["sha256"];
    blobs.insert(sha);
    const Adapter global = *common::DecodeAdapter(
        *common::ReadFileToString(dir.path() / "state" / "blobs" / sha), sha);
    EXPECT_EQ(global.A(0)(0, 0), 0.0f) << fmt::format("{}", fmt::join(order, ","));
  }
  EXPECT_EQ(blobs.size(), 1u);
}

}  // namespace
}  // namespace fedlora::testing
