// Each accumulator (server/accumulate/) against the formula it implements, computed here in
// double from the same updates: FedIT's weighted means, FLoRA's exact stacking, the median norm
// bound's cut, client-level DP's clipped mean (without noise, and its noise's scale), and a Fed-SB
// initialisation step's weighted sum. The updates come from a source that hands them out by client.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "absl/synchronization/mutex.h"
#include "common/base/strings.h"
#include "server/accumulate/client_dp.h"
#include "server/accumulate/every_factor.h"
#include "server/accumulate/median_norm_bound.h"
#include "server/accumulate/sketch_sum.h"
#include "server/accumulate/weighted_mean.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::MatrixD;
using ::testing::ElementsAre;

constexpr int kN = 6, kM = 5;

class FakeSource final : public UpdateSource {
 public:
  absl::StatusOr<Adapter> Update(const AcceptedUpdate& u, Adapter) const override {
    return adapters.at(u.client);
  }
  absl::StatusOr<std::vector<MatrixD>> Products(const AcceptedUpdate& u) const override {
    return products.at(u.client);
  }
  std::map<std::string, Adapter> adapters;
  std::map<std::string, std::vector<MatrixD>> products;
};

Adapter RandomAdapter(uint64_t seed, int rank = 2, double scaling = 1.0, bool has_r = false) {
  Adapter a = *Adapter::Create({{"m.q_proj", rank, kN, kM, scaling, has_r}});
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (float& x : a.values()) x = normal(rng);
  return a;
}

std::vector<AcceptedUpdate> Accepted(const std::vector<std::pair<std::string, int64_t>>& weights,
                                     const std::vector<double>& norms = {}) {
  std::vector<AcceptedUpdate> out;
  for (size_t k = 0; k < weights.size(); ++k)
    out.push_back({weights[k].first, "", weights[k].second, norms.empty() ? 0.0 : norms[k]});
  return out;
}

TEST(WeightedMeanTest, IsTheExamplesWeightedMeanOfAAndOfScaledB) {
  FakeSource source;
  const std::vector<std::pair<std::string, int64_t>> weights = {{"a", 10}, {"b", 30}, {"c", 60}};
  for (size_t k = 0; k < weights.size(); ++k)
    source.adapters[weights[k].first] = RandomAdapter(k + 1, 2, /*scaling=*/2.0);
  WeightedMean mean(common::Method::kFedIt, {{"m.q_proj", 2, kN, kM, 1.0, false}}, nullptr);
  auto out = mean.Aggregate(Accepted(weights), source);
  ASSERT_TRUE(out.ok()) << out.status();
  MatrixD a = MatrixD::Zero(2, kN), b = MatrixD::Zero(kM, 2);
  for (const auto& [id, w] : weights) {
    a += (w / 100.0) * source.adapters[id].A(0).cast<double>();
    b += (w / 100.0) * 2.0 * source.adapters[id].B(0).cast<double>();  // the scaling folded in
  }
  EXPECT_LT((out->adapter.A(0).cast<double>() - a).cwiseAbs().maxCoeff(), 1e-6);
  EXPECT_LT((out->adapter.B(0).cast<double>() - b).cwiseAbs().maxCoeff(), 1e-6);
  EXPECT_EQ(out->adapter.module(0).scaling, 1.0);
  EXPECT_THAT(out->aggregated, ElementsAre("a", "b", "c"));
}

// Updates are folded in the order given (client order), a window at a time: more updates than a
// window, each decoded on some core, still reach the fold one by one in order; each load after the
// first window is handed what the fold left of an update folded before it.
TEST(FoldInOrderTest, FoldsInTheGivenOrderWhateverTheWindow) {
  std::vector<AcceptedUpdate> updates;
  for (int k = 0; k < 300; ++k) updates.push_back({common::StrCat("c", 100 + k), "", 1, 0});
  std::vector<std::string> folded;
  absl::Mutex mu;
  std::map<std::string, std::string> handed;  // client → the spare its load was given
  const absl::Status st = FoldInOrder<std::string>(
      updates,
      [&](const AcceptedUpdate& u, std::string spare) -> absl::StatusOr<std::string> {
        absl::MutexLock lock(&mu);
        handed[u.client] = spare;
        return u.client;
      },
      [&](const AcceptedUpdate& u, std::string& decoded) {
        EXPECT_EQ(u.client, decoded);
        folded.push_back(decoded);
        decoded = "left by " + decoded;
        return absl::OkStatus();
      });
  ASSERT_TRUE(st.ok()) << st;
  EXPECT_EQ(folded, ClientsOf(updates));
  size_t fresh = 0;
  for (const auto& [client, spare] : handed) {
    if (spare.empty()) {
      ++fresh;
      continue;
    }
    ASSERT_TRUE(spare.starts_with("left by c")) << spare;
    EXPECT_LT(spare.substr(8), client);  // folded before this update was loaded
  }
  EXPECT_GT(fresh, 0u);
  EXPECT_LT(fresh, updates.size());  // the others decoded into memory an earlier update left
  // A failing load stops the fold there, with its error.
  const absl::Status failed = FoldInOrder<std::string>(
      updates,
      [](const AcceptedUpdate& u, std::string) -> absl::StatusOr<std::string> {
        if (u.client == "c120") return absl::DataLossError("c120's blob is damaged");
        return u.client;
      },
      [](const AcceptedUpdate&, std::string&) { return absl::OkStatus(); });
  EXPECT_TRUE(absl::IsDataLoss(failed)) << failed;
}

TEST(EveryFactorTest, FloraStacksExactlyTheWeightedSumOfProducts) {
  FakeSource source;
  source.adapters["a"] = RandomAdapter(7, 2, 4.0);
  source.adapters["b"] = RandomAdapter(8, 3, 0.5);  // another rank and scaling
  EveryFactor flora({common::Method::kFlora, {}});
  auto out = flora.Aggregate(Accepted({{"a", 1}, {"b", 3}}), source);
  ASSERT_TRUE(out.ok()) << out.status();
  const MatrixD want = 0.25 * 4.0 * source.adapters["a"].B(0).cast<double>() *
                           source.adapters["a"].A(0).cast<double>() +
                       0.75 * 0.5 * source.adapters["b"].B(0).cast<double>() *
                           source.adapters["b"].A(0).cast<double>();
  const MatrixD got = out->adapter.B(0).cast<double>() * out->adapter.A(0).cast<double>();
  EXPECT_EQ(out->adapter.module(0).rank, 5);
  EXPECT_LT((got - want).cwiseAbs().maxCoeff(), 1e-5);
}

// Records what it was given, so the cut can be checked.
class Recorder final : public Accumulator {
 public:
  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource&) override {
    given = ClientsOf(updates);
    RoundOutput out;
    out.aggregated = given;
    return out;
  }
  std::vector<std::string> given;
};

TEST(MedianNormBoundAccumulatorTest, LeavesOutWhatExceedsKTimesTheLowerMedian) {
  FakeSource source;
  auto recorder = std::make_unique<Recorder>();
  Recorder* inner = recorder.get();
  MedianNormBound bound(10, std::move(recorder));
  // Norms 1, 2, 15, 30: the lower median is 2, the bound 20.
  auto out =
      bound.Aggregate(Accepted({{"a", 1}, {"b", 1}, {"c", 1}, {"d", 1}}, {1, 2, 15, 30}), source);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_THAT(inner->given, ElementsAre("a", "b", "c"));
  ASSERT_EQ(out->norm_outliers.size(), 1u);
  EXPECT_EQ(out->norm_outliers.at("d"), 30);
  // Three: the lower median is the middle one (2), so neither a huge nor a tiny update sets it.
  out = bound.Aggregate(Accepted({{"a", 1}, {"m", 1}, {"z", 1}}, {1, 2, 1000}), source);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_THAT(inner->given, ElementsAre("a", "m"));
  // Run again (a retried commit), it cuts the same way.
  out = bound.Aggregate(Accepted({{"a", 1}, {"m", 1}, {"z", 1}}, {1, 2, 1000}), source);
  EXPECT_THAT(inner->given, ElementsAre("a", "m"));
  // Two: the lower median would be the smaller, and a tiny update would make an honest one the
  // outlier; no bound applies.
  out = bound.Aggregate(Accepted({{"a", 1}, {"z", 1}}, {1e-9, 1}), source);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_THAT(inner->given, ElementsAre("a", "z"));
  EXPECT_TRUE(out->norm_outliers.empty());
}

ServerOptions DpOptions(common::Method method, double clip, double z) {
  ServerOptions o;
  o.method = method;
  o.dp_clip = clip;
  o.dp_noise_multiplier = z;
  o.dp_delta = 1e-5;
  return o;
}

// Without noise the release is start + Σ_k clip_S(Δ_k) / m, m the cohort drawn (4 here, though 2
// arrived); the update far from the start is scaled to norm S, the near one kept.
TEST(ClientDpTest, ARoundIsTheStartPlusTheClippedSumOverTheCohort) {
  const ServerOptions o = DpOptions(common::Method::kFedSb, 1.0, 0.0);
  auto dp = ClientDp::Create(o);
  ASSERT_TRUE(dp.ok()) << dp.status();
  Adapter start = RandomAdapter(1, 2, 1.0, /*has_r=*/true);
  FakeSource source;
  source.adapters["near"] = start;
  source.adapters["far"] = start;
  source.adapters["near"].R(0)(0, 0) += 0.5f;  // ‖Δ‖ = 0.5 < S
  source.adapters["far"].R(0)(1, 1) += 8.0f;   // ‖Δ‖ = 8: clipped to 1
  auto acc = (*dp)->OpenRound({1.0, {}}, 1, /*cohort=*/4, /*population=*/8, start);
  ASSERT_TRUE(acc.ok() && *acc != nullptr) << acc.status();
  auto out = (*acc)->Aggregate(Accepted({{"far", 1}, {"near", 1}}), source);
  ASSERT_TRUE(out.ok()) << out.status();
  MatrixD want = start.R(0).cast<double>();
  want(0, 0) += 0.5 / 4;
  want(1, 1) += 1.0 / 4;
  EXPECT_LT((out->adapter.R(0).cast<double>() - want).cwiseAbs().maxCoeff(), 1e-6);
  ASSERT_TRUE(out->dp_state.has_value());
  ASSERT_EQ(out->dp_state->rounds.size(), 1u);
  EXPECT_EQ(out->dp_state->rounds[0].q, 0.5);
  EXPECT_FALSE(out->client_dp->epsilon.has_value());  // no noise: ε is infinite
  EXPECT_EQ(out->client_dp->sample_rate, 0.5);
}

TEST(ClientDpTest, ARoundPastTheTargetEpsilonIsNotOpened) {
  ServerOptions o = DpOptions(common::Method::kFedIt, 1.0, 0.8);
  o.dp_target_epsilon = 0.5;  // one full-batch round at z = 0.8 spends more
  auto dp = ClientDp::Create(o);
  ASSERT_TRUE(dp.ok());
  auto acc = (*dp)->OpenRound({1.0, {}}, 1, 4, 4, RandomAdapter(1));
  ASSERT_TRUE(acc.ok()) << acc.status();
  EXPECT_EQ(*acc, nullptr);
}

// What a client-level DP initialisation step releases, against its definition: each answer
// scaled to norm 1 (by hand: 3-4-0 and 0-0-12 become 0.6-0.8-0 and 0-0-1), the sum plus N(0, z²)
// per entry, over the cohort; the noise's scale measured on a zero sum.
TEST(ClientDpTest, ASketchStepScalesAnswersToNormOneAndNoisesTheSumOverTheCohort) {
  ServerOptions o = DpOptions(common::Method::kFedSb, 1.0, 0.5);
  o.dp_init_noise_multiplier = 0;
  auto dp = ClientDp::Create(o);
  ASSERT_TRUE(dp.ok());
  FakeSource source;
  MatrixD a(1, 2), b(1, 1);
  a << 3, 4;
  b << 0;
  source.products["x"] = {a, b};
  a << 0, 0;
  b << 12;
  source.products["y"] = {a, b};
  auto acc = (*dp)->OpenSketchStep({1.0, {}}, 0, /*cohort=*/2, 4, {{"p", 1, 2}, {"q", 1, 1}});
  ASSERT_TRUE(acc.ok() && *acc != nullptr);
  auto out = (*acc)->Aggregate(Accepted({{"x", 5}, {"y", 9}}), source);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_NEAR(out->sums[0](0, 0), 0.6 / 2, 1e-15);
  EXPECT_NEAR(out->sums[0](0, 1), 0.8 / 2, 1e-15);
  EXPECT_NEAR(out->sums[1](0, 0), 1.0 / 2, 1e-15);
  EXPECT_EQ(out->weight, 1);

  o.dp_init_noise_multiplier = 2;
  auto noisy_dp = ClientDp::Create(o);
  ASSERT_TRUE(noisy_dp.ok());
  FakeSource zeros;
  zeros.products["x"] = {MatrixD::Zero(100, 40)};
  auto noisy = (*noisy_dp)->OpenSketchStep({1.0, {}}, 0, /*cohort=*/4, 8, {{"p", 100, 40}});
  ASSERT_TRUE(noisy.ok() && *noisy != nullptr);
  out = (*noisy)->Aggregate(Accepted({{"x", 1}}), zeros);
  ASSERT_TRUE(out.ok()) << out.status();
  const double n = 4000, ms = out->sums[0].squaredNorm() / n;  // E = (z / cohort)² = 0.25
  EXPECT_NEAR(ms / 0.25, 1.0, 5 * std::sqrt(2 / n));
  ASSERT_EQ(out->dp_state->rounds.size(), 1u);
  EXPECT_EQ(out->dp_state->rounds[0].round, 0);
  EXPECT_EQ(out->dp_state->rounds[0].q, 0.5);
  EXPECT_EQ(out->dp_state->rounds[0].sigma, 2.0);
  EXPECT_EQ(out->client_dp->noise_multiplier, 2.0);
}

TEST(SketchSumTest, IsTheWeightedSumOfTheAnswersAndTheirWeight) {
  FakeSource source;
  MatrixD x(2, 1), y(2, 1);
  x << 1, 2;
  y << -3, 0.5;
  source.products["x"] = {x};
  source.products["y"] = {y};
  SketchSum sum({{"p", 2, 1}});
  auto out = sum.Aggregate(Accepted({{"x", 3}, {"y", 4}}), source);
  ASSERT_TRUE(out.ok()) << out.status();
  EXPECT_EQ(out->sums[0](0, 0), 3 * 1 + 4 * -3);
  EXPECT_EQ(out->sums[0](1, 0), 3 * 2 + 4 * 0.5);
  EXPECT_EQ(out->weight, 7);
}

}  // namespace
}  // namespace fedlora::server
