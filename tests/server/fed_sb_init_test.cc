// Fed-SB's initialisation in the round engine (server/fed_sb_init.h): the clients' gradients are
// known here in closed form (a shared low-rank part plus each client's own), so what the engine
// makes of their sketches is checked against the SVD of the example-weighted sum computed
// directly: the subspace (Wedin's bound), the singular values (Weyl's), R0's formula, the bytes
// each client sent, and that a restart or a late joiner changes nothing.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "common/aggregation/sketch.h"
#include "common/tensor/linalg.h"
#include "server/errors.h"
#include "tests/server/engine_harness.h"
#include "tests/test_util.h"

namespace fedlora::testing {
namespace {

namespace fs = std::filesystem;
using common::MatrixD;
using ::testing::HasSubstr;

const Modules kWide = {{"model.layers.0.self_attn.q_proj", 96, 128},
                       {"model.layers.0.self_attn.v_proj", 64, 80}};
const std::vector<std::string> kMembers = {"c1", "c2", "c3"};

v1::ErrorDetail::Reason ReasonOf(const absl::Status& status) {
  const auto detail = server::DetailOf(status);
  return detail ? detail->reason() : v1::ErrorDetail::REASON_UNSPECIFIED;
}

MatrixD Gaussian(int rows, int cols, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  MatrixD x(rows, cols);
  for (double& v : x.reshaped()) v = normal(rng);
  return x;
}

// Client `id`'s gradient of module i: a part every client shares, of rank 6 with a decaying
// spectrum, plus a smaller part of its own.
MatrixD ClientGradient(const std::string& id, size_t i) {
  const auto& [name, n, m] = kWide[i];
  std::mt19937_64 shared(100 + i), own(common::Fnv1a(id, i));
  Eigen::VectorXd s(6);
  s << 8, 6, 4, 3, 1, 0.5;
  const MatrixD u = common::ThinQr(Gaussian(m, 6, shared)).q;
  const MatrixD v = common::ThinQr(Gaussian(n, 6, shared)).q;
  return 1e-3 * (u * s.asDiagonal() * v.transpose() + 0.05 * Gaussian(m, n, own));
}

// Σ p_k G_k with p_k ∝ the examples each client joined with.
MatrixD SummedGradient(size_t i) {
  MatrixD g;
  double total = 0;
  for (const std::string& id : kMembers) {
    const double w = static_cast<double>(Harness::Examples(id));
    g = g.size() ? MatrixD(g + w * ClientGradient(id, i)) : MatrixD(w * ClientGradient(id, i));
    total += w;
  }
  return g / total;
}

class FedSbInitTest : public ::testing::Test {
 protected:
  FedSbInitTest() { Configure(h_); }

  void Configure(Harness& h) {
    h.options().fed_sb_init = "sketch";
    h.options().fed_sb_oversampling = 4;
    h.options().fed_sb_power_iterations = 1;
    h.options().fed_sb_init_lr = 0.01;
    h.options().rounds = 1;
    h.set_modules(kWide);
    h.set_gradient(ClientGradient);
  }
  void SetUp() override { ASSERT_TRUE(h_.Start().ok()); }
  fs::path state() const { return dir_ / "state"; }
  nlohmann::json Ledger() const { return ReadJson(state() / "ledger.json"); }
  std::string BlobBytes(const std::string& sha) const {
    return *common::ReadFileToString(state() / "blobs" / sha);
  }
  // Every client answers the step it is asked for; returns the task kind they got.
  v1::Task::Kind AllAnswer(Harness& h) {
    v1::Task::Kind kind = v1::Task::WAIT;
    for (const std::string& id : kMembers) {
      auto step = h.Step(id);
      EXPECT_TRUE(step.ok()) << id << ": " << step.status();
      kind = step.ok() ? *step : kind;
    }
    return kind;
  }
  void JoinAll(Harness& h) {
    for (const std::string& id : kMembers) ASSERT_TRUE(h.Join(id).ok()) << id;
  }
  common::Adapter Version0() const {
    const std::string sha = Ledger()["versions"][0]["blobs"][0]["sha256"];
    return *common::DecodeAdapter(BlobBytes(sha), "version 0");
  }

  ScratchDir dir_;
  TestEnv env_;
  Harness h_{TestOptions(dir_ / "state", "fed-sb"), &env_};
};

TEST_F(FedSbInitTest, SketchFindsTheTopSubspaceOfTheSummedGradient) {
  JoinAll(h_);
  // Range, transposed, power, project: 4 steps, then round 1 trains.
  for (int step = 1; step <= 4; ++step) {
    ASSERT_EQ(AllAnswer(h_), v1::Task::SKETCH) << step;
    EXPECT_EQ(Ledger()["versions"].size(), step < 4 ? 0u : 1u) << step;
  }
  auto task = h_.Task("c1");
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::TRAIN);
  ASSERT_EQ(task->downloads_size(), 1);
  EXPECT_EQ(task->downloads(0).kind(), v1::BLOB_KIND_FROZEN);

  const nlohmann::json ledger = Ledger();
  const common::Adapter v0 = Version0();
  const std::string last_basis = ledger["fed_sb_init"]["steps"][2]["basis"]["sha256"];
  const int r = kRank, l = r + 4;
  std::vector<common::MatrixShape> shapes;
  for (const auto& [name, n, m] : kWide) shapes.push_back({name, m, l});
  const std::vector<MatrixD> q = *common::DecodeMatrices(BlobBytes(last_basis), "basis", shapes);
  for (size_t i = 0; i < kWide.size(); ++i) {
    const auto& [name, n, m] = kWide[i];
    const MatrixD g = SummedGradient(i);
    const common::Svd exact = common::ThinSvd(g);
    const Eigen::VectorXd& sigma = exact.s;
    const MatrixD b = v0.B(i).cast<double>(), a = v0.A(i).cast<double>();
    const MatrixD r0 = v0.R(i).cast<double>();
    // B and A orthonormal; R0 diagonal.
    EXPECT_LT((b.transpose() * b - MatrixD::Identity(r, r)).norm(), 1e-5) << name;
    EXPECT_LT((a * a.transpose() - MatrixD::Identity(r, r)).norm(), 1e-5) << name;
    EXPECT_LT((r0 - MatrixD(r0.diagonal().asDiagonal())).norm(), 1e-12) << name;
    // The error left by the last basis, and what it allows (Wedin, Weyl).
    const double error = common::SingularValues(g - q[i] * q[i].transpose() * g)(0);
    const MatrixD z = q[i].transpose() * g;
    const Eigen::VectorXd s_hat = common::SingularValues(z).head(r);
    const double gap = s_hat(r - 1) - sigma(r);
    ASSERT_GT(gap, 0) << name;
    const MatrixD u_r = exact.u.leftCols(r), v_r = exact.v.leftCols(r);
    const double sin_u = common::SingularValues(b - u_r * (u_r.transpose() * b))(0);
    const double sin_v =
        common::SingularValues(a.transpose() - v_r * (v_r.transpose() * a.transpose()))(0);
    EXPECT_LE(sin_u, error / gap + 1e-4) << name;
    EXPECT_LE(sin_v, error / gap + 1e-4) << name;
    EXPECT_LT(sin_u, 0.1) << name;  // within 6 degrees here
    for (int j = 0; j < r; ++j) {
      EXPECT_LE(s_hat(j), sigma(j) * (1 + 1e-9)) << name << " " << j;
      EXPECT_GE(s_hat(j), sigma(j) - error - 1e-12) << name << " " << j;
    }
    // R0 = −η·√(mn)/‖Z‖_F·Σ̂_r: the rank-r part of a first step −η·G/rms(G).
    const double scale = -0.01 * std::sqrt(static_cast<double>(m) * n) / z.norm();
    for (int j = 0; j < r; ++j)
      EXPECT_NEAR(r0(j, j), scale * s_hat(j), 1e-5 * std::abs(scale * s_hat(j))) << name << j;
    // The start is W0 + trunc_r(−η·G/rms): B·R0·A against the exact truncation of the sum.
    const MatrixD start = b * r0 * a;
    const MatrixD ideal = scale * u_r * sigma.head(r).asDiagonal() * v_r.transpose();
    EXPECT_LT((start - ideal).norm() / ideal.norm(), 0.1) << name;
  }
  // Bytes: each client's four answers are products of width l, never an m×n matrix.
  const nlohmann::json record = ledger["versions"][0]["record"];
  int64_t thin = 0, dense = 0;
  for (const auto& [name, n, m] : kWide) {
    thin += int64_t{4} * (2 * m + 2 * n) * l;  // G·Ω, Gᵀ·Q, G·Q̃, Qᵀ·G in f32
    dense += int64_t{4} * m * n;
  }
  for (const std::string& id : kMembers) {
    const int64_t sent = record["init_bytes_up"][id].get<int64_t>();
    EXPECT_GE(sent, thin) << id;
    EXPECT_LT(sent, thin + 4 * 1024) << id;  // plus four safetensors headers
    EXPECT_LT(sent, dense / 2) << id;
  }
}

TEST_F(FedSbInitTest, DenseIsTheTrainersSignStepTruncated) {
  h_.Stop();
  h_.options().fed_sb_init = "dense";
  ASSERT_TRUE(h_.Start().ok());
  JoinAll(h_);
  ASSERT_EQ(AllAnswer(h_), v1::Task::SKETCH);
  ASSERT_EQ(Ledger()["versions"].size(), 1u);
  const common::Adapter v0 = Version0();
  for (size_t i = 0; i < kWide.size(); ++i) {
    const MatrixD g = SummedGradient(i);
    const MatrixD delta = g.unaryExpr([](double x) { return -0.01 * ((x > 0) - (x < 0)); });
    const common::Svd svd = common::ThinSvd(delta);
    const MatrixD ideal =
        svd.u.leftCols(kRank) * svd.s.head(kRank).asDiagonal() * svd.v.leftCols(kRank).transpose();
    const MatrixD start = v0.B(i).cast<double>() * v0.R(i).cast<double>() * v0.A(i).cast<double>();
    EXPECT_LT((start - ideal).norm() / ideal.norm(), 1e-5) << i;
  }
}

TEST_F(FedSbInitTest, RestartMidwayAndLateJoinerEndWithTheSameVersion0) {
  // Reference: an uninterrupted initialisation in another state directory.
  ScratchDir other;
  TestEnv other_env;
  Harness reference{TestOptions(other.path() / "state", "fed-sb"), &other_env};
  Configure(reference);
  ASSERT_TRUE(reference.Start().ok());
  JoinAll(reference);
  for (int step = 1; step <= 4; ++step) ASSERT_EQ(AllAnswer(reference), v1::Task::SKETCH);
  const nlohmann::json expected = ReadJson(other.path() / "state" / "ledger.json");

  JoinAll(h_);
  ASSERT_EQ(AllAnswer(h_), v1::Task::SKETCH);
  ASSERT_EQ(AllAnswer(h_), v1::Task::SKETCH);
  // c1 answers step 3, then the coordinator restarts: step 3 is redone from the ledger.
  ASSERT_TRUE(h_.Step("c1").ok());
  h_.Stop();
  ASSERT_TRUE(h_.Start().ok());
  EXPECT_EQ(Ledger()["fed_sb_init"]["steps"].size(), 2u);
  JoinAll(h_);
  auto task = h_.Task("c2");
  ASSERT_TRUE(task.ok());
  EXPECT_EQ(task->kind(), v1::Task::SKETCH);
  EXPECT_EQ(task->sketch().step(), 2);
  EXPECT_EQ(task->sketch().product(), "power");
  ASSERT_EQ(AllAnswer(h_), v1::Task::SKETCH);
  ASSERT_EQ(AllAnswer(h_), v1::Task::SKETCH);
  EXPECT_EQ(Ledger()["versions"][0]["blobs"][0]["sha256"],
            expected["versions"][0]["blobs"][0]["sha256"]);

  // A client that joins now (too late for round 1's cohort) holds the same version 0 too: it is
  // the first thing it downloads when the run ends.
  ASSERT_TRUE(h_.Join("c4").ok());
  ASSERT_EQ(AllAnswer(h_), v1::Task::TRAIN);
  auto late = h_.Task("c4");
  ASSERT_TRUE(late.ok());
  ASSERT_EQ(late->kind(), v1::Task::DONE);
  ASSERT_EQ(late->downloads_size(), 2);
  EXPECT_EQ(late->downloads(0).sha256(), expected["versions"][0]["blobs"][0]["sha256"]);
}

TEST_F(FedSbInitTest, AnswersForAnotherStepAreLateOrStale) {
  JoinAll(h_);
  auto task = h_.Task("c1");
  ASSERT_TRUE(task.ok());
  ASSERT_EQ(task->kind(), v1::Task::SKETCH);
  const std::string answer = *h_.SketchAnswer("c1", *task);
  v1::Task ahead = *task;
  ahead.mutable_sketch()->set_step(1);
  auto stale = h_.Send("c1", ahead, answer);
  EXPECT_EQ(ReasonOf(stale.status()), v1::ErrorDetail::STALE_TASK) << stale.status();
  ASSERT_EQ(AllAnswer(h_), v1::Task::SKETCH);  // step 1 closes
  auto late = h_.Send("c1", *task, answer);
  EXPECT_EQ(ReasonOf(late.status()), v1::ErrorDetail::LATE) << late.status();
  // A product of the wrong shape is refused, naming the module.
  auto next = h_.Task("c2");
  ASSERT_TRUE(next.ok());
  common::NamedMatrix wrong{std::get<0>(kWide[0]), MatrixD::Zero(3, 3)};
  auto refused = h_.Send(
      "c2", *next, common::EncodeMatrices({wrong, {std::get<0>(kWide[1]), MatrixD::Zero(1, 1)}}));
  EXPECT_EQ(ReasonOf(refused.status()), v1::ErrorDetail::REJECTED);
  EXPECT_THAT(refused.status().message(), HasSubstr("model.layers.0.self_attn.q_proj"));
}

// Client-level DP: each step of the initialisation is one Gaussian mechanism of the coordinator's
// (q = cohort / population = 1 here, noise multiplier z), so after the 4 steps and round 1 the run
// has spent ε of 5 full-batch steps, against 1 when fed-sb starts from random B and A; with a
// noise multiplier of its own (3) each step costs (z/3)² of a round.
TEST_F(FedSbInitTest, ClientLevelDpCountsEveryStepOfTheInitialisation) {
  const double z = 1.4, delta = 1e-5;
  for (const std::string init : {"sketch", "random", "sketch at z 3"}) {
    ScratchDir dir;
    TestEnv env;
    Harness h{TestOptions(dir.path() / "state", "fed-sb"), &env};
    Configure(h);
    const bool own_z = init == "sketch at z 3";  // the initialisation's own noise multiplier
    h.options().fed_sb_init = own_z ? "sketch" : init;
    h.options().dp_clip = 1.0;
    h.options().dp_noise_multiplier = z;
    if (own_z) h.options().dp_init_noise_multiplier = 3;
    h.options().dp_delta = delta;
    ASSERT_TRUE(h.Start().ok()) << init;
    JoinAll(h);
    const int steps = init == "random" ? 0 : 4;
    // RDP α/(2·3²) a step at z 3 is that of (z/3)² steps at z.
    const double init_steps = own_z ? steps * (z / 3) * (z / 3) : steps;
    for (int step = 1; step <= steps; ++step) ASSERT_EQ(AllAnswer(h), v1::Task::SKETCH) << step;
    ASSERT_EQ(AllAnswer(h), v1::Task::TRAIN) << init;  // round 1
    const nlohmann::json ledger = ReadJson(dir.path() / "state" / "ledger.json");
    const nlohmann::json& history = ledger["client_dp"]["rounds"];
    ASSERT_EQ(history.size(), steps + 1u) << init;
    for (int s = 0; s < steps; ++s) {
      EXPECT_EQ(history[s]["round"], 0) << s;
      EXPECT_EQ(history[s]["q"], 1.0) << s;
      EXPECT_EQ(history[s]["sigma"], own_z ? 3.0 : z) << s;
      EXPECT_EQ(history[s]["steps"], 1.0) << s;
    }
    if (steps > 0) {
      EXPECT_NEAR(ledger["versions"][0]["record"]["client_dp"]["epsilon"].get<double>(),
                  EpsilonAtFullBatch(z, init_steps, delta), 1e-9);
    }
    EXPECT_NEAR(ledger["versions"][1]["record"]["client_dp"]["epsilon"].get<double>(),
                EpsilonAtFullBatch(z, init_steps + 1, delta), 1e-9)
        << init;
  }
}

}  // namespace
}  // namespace fedlora::testing
