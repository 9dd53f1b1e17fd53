#include "common/privacy/client_dp.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "common/aggregation/aggregate.h"
#include "tests/test_util.h"

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;
using testing::MatrixD;
using testing::ModuleSpec;
using testing::RandomAdapter;

// Δ of one module as a flat vector: (A − A0, s·B − B0), or s·R − R0.
Eigen::VectorXd Delta(const Adapter& u, const Adapter& start, size_t i) {
  const double s = u.module(i).scaling;
  if (u.module(i).has_r) {
    const MatrixD d = s * u.R(i).cast<double>() - start.R(i).cast<double>();
    return d.reshaped();
  }
  const MatrixD da = u.A(i).cast<double>() - start.A(i).cast<double>();
  const MatrixD db = s * u.B(i).cast<double>() - start.B(i).cast<double>();
  Eigen::VectorXd out(da.size() + db.size());
  out << da.reshaped(), db.reshaped();
  return out;
}

TEST(ClientDpRoundTest, ClipsEachUpdateFlatAndDividesByTheCohortDrawn) {
  const std::vector<ModuleSpec> specs = {{"q", 3, 7, 5, 1.0}, {"v", 2, 7, 4, 1.0}};
  const Adapter start = RandomAdapter(specs, 1);
  // Client updates at other scalings (folded into B), one small and one large.
  std::vector<ModuleSpec> scaled = specs;
  for (auto& s : scaled) s.scaling = 2.5;
  const Adapter large = RandomAdapter(scaled, 3);
  Adapter small = start;  // start plus a small step
  const Adapter step = RandomAdapter(specs, 2);
  for (size_t k = 0; k < small.values().size(); ++k) small.values()[k] += 0.05f * step.values()[k];
  const double clip = 3.0, cohort = 3;  // three drawn, two arrived
  ClientDpRound round(start, clip, cohort);
  std::vector<Eigen::VectorXd> sum(2);
  for (const Adapter* u : {static_cast<const Adapter*>(&small), &large}) {
    double norm_sq = 0;
    for (size_t i = 0; i < 2; ++i) norm_sq += Delta(*u, start, i).squaredNorm();
    const double norm = std::sqrt(norm_sq);
    absl::StatusOr<double> got = round.Add(*u);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_NEAR(*got, norm, 1e-5 * norm);
    const double factor = std::min(1.0, clip / (norm + 1e-6));
    for (size_t i = 0; i < 2; ++i) {
      const Eigen::VectorXd d = factor * Delta(*u, start, i);
      sum[i] = sum[i].size() ? Eigen::VectorXd(sum[i] + d) : d;
    }
  }
  // The two updates straddle the clip, so both branches are exercised.
  EXPECT_LT(round.norms()[0], clip);
  EXPECT_GT(round.norms()[1], clip);
  GaussianNoise noise = GaussianNoise::ForTestingOnly(1);
  const Adapter out = round.Finish(/*noise_multiplier=*/0, noise);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(out.module(i).scaling, 1.0);
    const Eigen::VectorXd got = Delta(out, start, i);
    EXPECT_LT((got - sum[i] / cohort).norm(), 1e-6 * sum[i].norm());
  }
}

TEST(ClientDpRoundTest, FedSbClipsAndNoisesOnlyR) {
  const std::vector<ModuleSpec> specs = {{"q", 4, 9, 6, 1.0, true}};
  const Adapter start = RandomAdapter(specs, 5);
  Adapter update = start;
  update.set_scaling(0, 0.5);
  for (float& x : update.R(0).reshaped()) x = 3.0f;  // s·R − R0 = 1.5 − R0
  ClientDpRound round(start, /*clip=*/1.0, /*expected_clients=*/2);
  const Eigen::VectorXd delta = Delta(update, start, 0);
  EXPECT_NEAR(*round.Add(update), delta.norm(), 1e-5 * delta.norm());
  GaussianNoise noise = GaussianNoise::ForTestingOnly(2);
  const Adapter out = round.Finish(0, noise);
  const Eigen::VectorXd got = Delta(out, start, 0);
  EXPECT_LT((got - delta / (delta.norm() + 1e-6) / 2).norm(), 1e-6);
  // B and A are frozen: untouched.
  EXPECT_EQ(out.A(0), start.A(0));
  EXPECT_EQ(out.B(0), start.B(0));
}

TEST(ClientDpRoundTest, NoiseIsGaussianWithStddevZTimesClipOverM) {
  std::vector<ModuleSpec> specs;
  for (int k = 0; k < 4; ++k) specs.push_back({"m" + std::to_string(k), 8, 128, 64});
  const Adapter start = RandomAdapter(specs, 7);
  const double clip = 2.0, z = 1.5, m = 4;
  ClientDpRound round(start, clip, m);
  ASSERT_TRUE(round.Add(start).ok());  // Δ = 0: what remains is the noise
  GaussianNoise noise = GaussianNoise::ForTestingOnly(3);
  const Adapter out = round.Finish(z, noise);
  double sum = 0, sq = 0, n = 0;
  for (size_t i = 0; i < out.num_modules(); ++i) {
    const Eigen::VectorXd d = Delta(out, start, i) / (z * clip / m);
    sum += d.sum();
    sq += d.squaredNorm();
    n += static_cast<double>(d.size());
  }
  // 5-sigma bounds of the standardised sample: mean ~ N(0, 1/n), second moment ~ N(1, 2/n).
  EXPECT_LT(std::abs(sum / n), 5 / std::sqrt(n));
  EXPECT_LT(std::abs(sq / n - 1), 5 * std::sqrt(2 / n));
}

TEST(ClientDpRoundTest, RefusesAnUpdateOfAnotherShape) {
  const Adapter start = RandomAdapter({{"q", 3, 7, 5}}, 1);
  ClientDpRound round(start, 1.0, 2);
  EXPECT_THAT(round.Add(RandomAdapter({{"q", 2, 7, 5}}, 2)).status().message(),
              HasSubstr("module q has rank 2, 5x7; the round's state has rank 3, 5x7"));
  EXPECT_THAT(round.Add(RandomAdapter({{"k", 3, 7, 5}}, 2)).status().message(),
              HasSubstr("lacks module q"));
}

// With nothing clipped and no noise, and the target inside Ā's row space (every client has the same
// A, so ΔW* = B̄·Ā's row space holds all of it), the private correction solves exactly the problem
// the non-private LoRA-FAIR solves.
TEST(PrivateLoraFairTest, EqualsLoraFairWhenNothingIsClippedOrNoised) {
  const std::vector<ModuleSpec> specs = {{"q", 3, 10, 8, 1.0}, {"v", 3, 10, 6, 1.0}};
  const Adapter start = RandomAdapter(specs, 11);
  std::vector<Adapter> clients;
  for (int k = 0; k < 3; ++k) {
    Adapter c = RandomAdapter(specs, 20 + k);
    for (size_t i = 0; i < c.num_modules(); ++i) c.A(i) = start.A(i) * 1.3f;
    // Make the target differ from B̄Ā's direction: different scalings per client.
    c.set_scaling(0, 0.5 + k);
    clients.push_back(std::move(c));
  }
  ClientDpRound round(start, /*clip=*/1e6, /*expected_clients=*/3);
  for (const Adapter& c : clients) ASSERT_TRUE(round.Add(c).ok());
  GaussianNoise noise = GaussianNoise::ForTestingOnly(4);
  Adapter global = round.Finish(0, noise);
  const LoraFairOptions options{.lambda = 0.01};
  auto solutions = PrivateLoraFairCorrection(clients, start, global, 1e6, 0, 3, noise, options);
  ASSERT_TRUE(solutions.ok()) << solutions.status();
  auto reference = Aggregate(clients, {}, {Method::kLoraFair, options});
  ASSERT_TRUE(reference.ok()) << reference.status();
  for (size_t i = 0; i < global.num_modules(); ++i) {
    EXPECT_LT(
        testing::RelativeDiff(global.A(i).cast<double>(), reference->adapter.A(i).cast<double>()),
        1e-5);
    EXPECT_LT(
        testing::RelativeDiff(global.B(i).cast<double>(), reference->adapter.B(i).cast<double>()),
        1e-4);
    EXPECT_NEAR((*solutions)[i].objective, reference->modules[i].lora_fair.objective, 1e-6);
    EXPECT_LT((*solutions)[i].objective, (*solutions)[i].fedit_objective);
  }
}

}  // namespace
}  // namespace fedlora::common
