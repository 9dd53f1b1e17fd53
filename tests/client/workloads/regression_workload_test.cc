// The regression workload's DP-SGD against full-batch descent, its independent reference: with
// every example sampled, no noise and a clip no gradient reaches, a DP-SGD step is a descent step
// (the mean of the per-example gradients is the batch gradient); with one example and a tiny clip,
// a clip at half its gradient's norm halves the descent step. Fed-SB's initialisation under
// DP-SGD the same way, against the closed-form gradient, and its cost in ε against the RDP of the
// Gaussian mechanism at q = 1 (α/(2σ²) a step) computed here.
#include "client/workloads/regression_workload.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/aggregation/sketch.h"
#include "common/tensor/adapter.h"
#include "tests/scratch_dir.h"
#include "tests/test_util.h"

namespace fedlora::client {
namespace {

common::Adapter Start(const RegressionWorkload& w, bool lora_sb, uint64_t seed) {
  std::vector<testing::ModuleSpec> specs;
  for (const v1::ModuleSpec& m : w.modules())
    specs.push_back({m.name(), 3, m.in_features(), m.out_features(), 0.7, lora_sb});
  return testing::RandomAdapter(specs, seed);
}

Eigen::VectorXd Change(const common::Adapter& after, const common::Adapter& before) {
  Eigen::VectorXd d(after.values().size());
  for (size_t k = 0; k < after.values().size(); ++k)
    d(static_cast<Eigen::Index>(k)) = double(after.values()[k]) - before.values()[k];
  return d;
}

// Descent, DP-SGD with a test noise stream and sampler, and the base gradients give the same bits
// when run again after the heap has been disturbed (the workload compared with itself:
// repeatability is the property under test).
TEST(RegressionWorkloadTest, RunsReproduceToTheBit) {
  RegressionOptions o;
  o.layers = 2, o.in_features = 12, o.out_features = 9, o.examples = 64;
  o.privacy.dp = {.noise_multiplier = 0.8, .clip = 0.5, .sample_rate = 0.3};
  const auto run = [&] {
    const RegressionWorkload w(o);
    std::string out;
    const auto add = [&](const void* p, size_t bytes) {
      out.append(static_cast<const char*>(p), bytes);
    };
    for (bool lora_sb : {false, true}) {
      common::Adapter plain = Start(w, lora_sb, 5), priv = plain;
      w.Descend(plain, 3, 0.05);
      common::GaussianNoise noise = common::GaussianNoise::ForTestingOnly(2);
      std::mt19937_64 sampler(3);
      w.DescendPrivately(priv, 3, 0.05, noise, sampler);
      add(plain.values().data(), plain.values().size_bytes());
      add(priv.values().data(), priv.values().size_bytes());
    }
    for (const v1::ModuleSpec& m : w.modules()) {
      const common::MatrixD g = *w.BaseGradient(m.name());
      add(g.data(), static_cast<size_t>(g.size()) * sizeof(double));
    }
    return out;
  };
  const std::string first = run();
  for (uint64_t seed : {1, 2}) {
    const testing::HeapShift shift(seed);
    EXPECT_TRUE(run() == first) << "after disturbing the heap (" << seed << ")";
  }
}

class DpSgdTest : public ::testing::TestWithParam<bool> {};  // LoRA-SB or LoRA

TEST_P(DpSgdTest, WithoutClippingOrNoiseIsFullBatchDescent) {
  RegressionOptions o;
  o.layers = 2, o.in_features = 6, o.out_features = 5, o.examples = 40;
  o.privacy.dp = {.noise_multiplier = 0, .clip = 1e9, .sample_rate = 1.0};
  const RegressionWorkload w(o);
  const common::Adapter start = Start(w, GetParam(), 3);
  common::Adapter plain = start, priv = start;
  w.Descend(plain, 1, 0.05);
  common::GaussianNoise noise = common::GaussianNoise::ForTestingOnly(1);
  std::mt19937_64 sampler(1);
  w.DescendPrivately(priv, 1, 0.05, noise, sampler);
  const Eigen::VectorXd want = Change(plain, start), got = Change(priv, start);
  ASSERT_GT(want.norm(), 0);
  EXPECT_LT((got - want).norm(), 1e-5 * want.norm());
}

TEST_P(DpSgdTest, OneExampleIsClippedToTheClipNorm) {
  RegressionOptions o;
  o.layers = 2, o.in_features = 6, o.out_features = 5, o.examples = 1;
  const double lr = 0.01;
  const common::Adapter start = Start(RegressionWorkload(o), GetParam(), 4);
  common::Adapter plain = start;
  RegressionWorkload(o).Descend(plain, 1, lr);
  const Eigen::VectorXd want = Change(plain, start);  // lr·g
  // A clip at half the example's gradient norm halves the step.
  o.privacy.dp = {.noise_multiplier = 0, .clip = 0.5 * want.norm() / lr, .sample_rate = 1.0};
  common::Adapter priv = start;
  common::GaussianNoise noise = common::GaussianNoise::ForTestingOnly(2);
  std::mt19937_64 sampler(2);
  RegressionWorkload(o).DescendPrivately(priv, 1, lr, noise, sampler);
  EXPECT_LT((Change(priv, start) - 0.5 * want).norm(), 1e-4 * want.norm());
}

TEST_P(DpSgdTest, NoiseHasStddevSigmaCOverTheExpectedSample) {
  RegressionOptions o;
  o.layers = 3, o.in_features = 20, o.out_features = 16, o.examples = 50;
  const double sigma = 2.0, clip = 0.3, q = 0.2, lr = 1.0;
  // About 10 examples' gradients, each clipped to C, against noise of σC per coordinate over a few
  // hundred coordinates: what moves the factors is mostly the noise.
  o.privacy.dp = {.noise_multiplier = sigma, .clip = clip, .sample_rate = q};
  const RegressionWorkload w(o);
  const common::Adapter start = Start(w, GetParam(), 5);
  common::Adapter priv = start;
  common::GaussianNoise noise = common::GaussianNoise::ForTestingOnly(3);
  std::mt19937_64 sampler(3);
  w.DescendPrivately(priv, 1, lr, noise, sampler);
  const Eigen::VectorXd d = Change(priv, start);
  const double expected_sample = q * 50, stddev = lr * sigma * clip / expected_sample;
  double sq = 0, n = 0;
  for (Eigen::Index k = 0; k < d.size(); ++k) {
    if (d(k) == 0) continue;  // frozen A and B of LoRA-SB
    sq += (d(k) / stddev) * (d(k) / stddev);
    ++n;
  }
  // The clipped data gradients (norm ≤ ~10·C/(qN)) can raise the mean square by < 0.2.
  EXPECT_LT(std::abs(sq / n - 1), 5 * std::sqrt(2 / n) + 0.2) << n;
}

// A SKETCH task for the workload's modules: width `columns`, range step.
v1::Task SketchTask(const RegressionWorkload& w, int columns) {
  v1::Task task;
  task.set_kind(v1::Task::SKETCH);
  for (const v1::ModuleSpec& m : w.modules()) *task.add_modules() = m;
  task.mutable_sketch()->set_columns(columns);
  task.mutable_sketch()->set_seed(9);
  return task;
}

std::vector<common::MatrixD> RangeBases(const RegressionWorkload& w, int columns) {
  std::vector<common::MatrixD> bases;
  for (const v1::ModuleSpec& m : w.modules()) {
    const int l = common::SketchColumns(columns, m.out_features(), m.in_features());
    bases.push_back(common::RangeBasis(9, bases.size(), m.in_features(), l));
  }
  return bases;
}

class RegressionSketchTest : public ::testing::Test {
 protected:
  RegressionSketchTest() {
    o_.layers = 2, o_.in_features = 12, o_.out_features = 9, o_.examples = 30;
    o_.privacy.ledger = (dir_ / "privacy.json").string();
  }
  testing::ScratchDir dir_;
  RegressionOptions o_;
};

TEST_F(RegressionSketchTest, WithoutClippingOrNoiseIsTheClosedFormGradientsProduct) {
  o_.privacy.dp = {.noise_multiplier = 0, .clip = 1e9};
  RegressionWorkload w(o_);
  const std::vector<common::MatrixD> bases = RangeBases(w, 5);
  const auto got = w.Sketch(SketchTask(w, 5), common::SketchStep::kRange, bases);
  ASSERT_TRUE(got.ok()) << got.status();
  for (size_t i = 0; i < bases.size(); ++i) {
    const common::MatrixD want = *w.BaseGradient(w.modules()[i].name()) * bases[i];
    EXPECT_LT(((*got)[i] - want).norm(), 1e-12 * want.norm()) << i;
  }
}

TEST_F(RegressionSketchTest, NoiseIsTheInitialisationsSigmaTimesCOverTheRecords) {
  // The training's σ is 0; the initialisation's 2. With a clip no gradient reaches, the noise,
  // σ·C/N per entry, swamps the gradient's product, so answer·N/(σC) is standard normal.
  const double sigma = 2, clip = 1e9;
  o_.privacy.dp = {.noise_multiplier = 0, .clip = clip};
  o_.privacy.init_noise_multiplier = sigma;
  RegressionWorkload w(o_);
  const std::vector<common::MatrixD> bases = RangeBases(w, 9);
  const auto got = w.Sketch(SketchTask(w, 9), common::SketchStep::kRange, bases);
  ASSERT_TRUE(got.ok()) << got.status();
  double sq = 0, n = 0;
  for (const common::MatrixD& p : *got) {
    sq += (p * (o_.examples / (sigma * clip))).squaredNorm();
    n += static_cast<double>(p.size());
  }
  EXPECT_NEAR(sq / n, 1.0, 5 * std::sqrt(2 / n)) << n;
}

TEST_F(RegressionSketchTest, OneRecordIsClippedFlatOverTheModules) {
  o_.examples = 1;
  const RegressionWorkload plain(o_);
  double norm_sq = 0;
  for (const v1::ModuleSpec& m : plain.modules())
    norm_sq += plain.BaseGradient(m.name())->squaredNorm();
  o_.privacy.dp = {.noise_multiplier = 0, .clip = 0.5 * std::sqrt(norm_sq)};
  RegressionWorkload w(o_);
  const std::vector<common::MatrixD> bases = RangeBases(w, 4);
  const auto got = w.Sketch(SketchTask(w, 4), common::SketchStep::kRange, bases);
  ASSERT_TRUE(got.ok()) << got.status();
  for (size_t i = 0; i < bases.size(); ++i) {
    const common::MatrixD want = 0.5 * *plain.BaseGradient(w.modules()[i].name()) * bases[i];
    EXPECT_LT(((*got)[i] - want).norm(), 1e-6 * want.norm()) << i;
  }
}

TEST_F(RegressionSketchTest, TheInitialisationIsCountedInTheClientsEpsilon) {
  const double sigma = 1.3, delta = 1e-5;
  o_.privacy.dp = {.noise_multiplier = sigma, .clip = 0.5, .sample_rate = 1.0};
  o_.privacy.delta = delta;
  v1::Task round;
  round.set_round(1);
  round.mutable_settings()->set_local_steps(3);
  round.mutable_settings()->set_learning_rate(0.01);
  // Without the initialisation: three steps.
  RegressionWorkload without(o_);
  common::Adapter a = Start(without, true, 6);
  const auto alone = without.Train(round, a);
  ASSERT_TRUE(alone.ok()) << alone.status();
  EXPECT_NEAR(alone->dp_epsilon(), testing::EpsilonAtFullBatch(sigma, 3, delta), 1e-9);
  // With a two-step initialisation first (range, then projection): five.
  std::filesystem::remove(o_.privacy.ledger);
  RegressionWorkload with(o_);
  const v1::Task task = SketchTask(with, 4);
  const std::vector<common::MatrixD> bases = RangeBases(with, 4);
  ASSERT_TRUE(with.Sketch(task, common::SketchStep::kRange, bases).ok());
  std::vector<common::MatrixD> project;
  for (const v1::ModuleSpec& m : with.modules())
    project.push_back(common::RangeBasis(10, project.size(), m.out_features(), 4));
  ASSERT_TRUE(with.Sketch(task, common::SketchStep::kProject, project).ok());
  a = Start(with, true, 6);
  const auto after = with.Train(round, a);
  ASSERT_TRUE(after.ok()) << after.status();
  EXPECT_NEAR(after->dp_epsilon(), testing::EpsilonAtFullBatch(sigma, 5, delta), 1e-9);
  EXPECT_GT(after->dp_epsilon(), alone->dp_epsilon());
  // With a noise multiplier of its own for the initialisation: RDP α/(2σ_i²) per init step
  // plus α/(2σ²) per training step, i.e. the ε of 3 + 2·(σ/σ_i)² steps at σ.
  std::filesystem::remove(o_.privacy.ledger);
  o_.privacy.init_noise_multiplier = 4.0;
  RegressionWorkload own(o_);
  ASSERT_TRUE(own.Sketch(task, common::SketchStep::kRange, bases).ok());
  ASSERT_TRUE(own.Sketch(task, common::SketchStep::kProject, project).ok());
  a = Start(own, true, 6);
  const auto cheaper = own.Train(round, a);
  ASSERT_TRUE(cheaper.ok()) << cheaper.status();
  const double steps = 3 + 2 * (sigma / 4.0) * (sigma / 4.0);
  EXPECT_NEAR(cheaper->dp_epsilon(), testing::EpsilonAtFullBatch(sigma, steps, delta), 1e-9);
}

TEST_F(RegressionSketchTest, ABasisThatStretchesIsRefusedAndNothingIsSpent) {
  o_.privacy.dp = {.noise_multiplier = 1.0, .clip = 1.0};
  RegressionWorkload w(o_);
  std::vector<common::MatrixD> bases = RangeBases(w, 4);
  bases[1] *= 3;  // amplifies one record against the noise
  const auto got = w.Sketch(SketchTask(w, 4), common::SketchStep::kRange, bases);
  EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(got.status().message(), ::testing::HasSubstr("must not stretch"));
  EXPECT_FALSE(std::filesystem::exists(o_.privacy.ledger));
  // One basis short: refused, saying so.
  bases.pop_back();
  const auto short_ = w.Sketch(SketchTask(w, 4), common::SketchStep::kRange, bases);
  EXPECT_EQ(short_.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(short_.status().message(), ::testing::HasSubstr("1 sketch bases for 2 modules"));
}

INSTANTIATE_TEST_SUITE_P(Factors, DpSgdTest, ::testing::Values(false, true),
                         [](const auto& info) { return info.param ? "LoraSb" : "Lora"; });

}  // namespace
}  // namespace fedlora::client
