// The Dirichlet partitioner against the definitions in partition.h: the symmetric Dirichlet's
// mean 1/n and variance (1/n)(1 − 1/n)/(nα + 1) over many draws, its limits α → ∞ (equal parts)
// and α → 0 (one part takes all, each as often), and each of the two meanings — per-client label
// proportions, per-label client shares — checked for what sets it apart.
#include "common/base/partition.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <set>

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

struct Moments {
  double mean = 0, variance = 0;
};

// Per coordinate, the sample mean and variance of rows of equal length.
std::vector<Moments> PerCoordinate(const std::vector<std::vector<double>>& rows) {
  std::vector<Moments> m(rows.at(0).size());
  const double n = static_cast<double>(rows.size());
  for (const auto& row : rows)
    for (size_t i = 0; i < row.size(); ++i) m[i].mean += row[i] / n;
  for (const auto& row : rows)
    for (size_t i = 0; i < row.size(); ++i)
      m[i].variance += (row[i] - m[i].mean) * (row[i] - m[i].mean) / (n - 1);
  return m;
}

double DirichletVariance(int n, double alpha) {
  return (1.0 / n) * (1 - 1.0 / n) / (n * alpha + 1);
}

// Each coordinate's mean is 1/n within 5 standard errors, its variance the formula's within 12%.
void ExpectDirichletMoments(const std::vector<std::vector<double>>& rows, int n, double alpha) {
  const double variance = DirichletVariance(n, alpha);
  const double standard_error = std::sqrt(variance / static_cast<double>(rows.size()));
  for (const Moments& m : PerCoordinate(rows)) {
    EXPECT_NEAR(m.mean, 1.0 / n, 5 * standard_error) << "alpha " << alpha;
    EXPECT_NEAR(m.variance, variance, 0.12 * variance) << "alpha " << alpha;
  }
}

TEST(DirichletSampleTest, MeanAndVarianceAreTheDirichlets) {
  for (double alpha : {0.1, 0.5, 1.0, 10.0}) {
    std::mt19937_64 rng(7);
    std::vector<std::vector<double>> rows;
    for (int i = 0; i < 20000; ++i) {
      rows.push_back(DirichletSample(4, alpha, rng));
      ASSERT_NEAR(std::accumulate(rows.back().begin(), rows.back().end(), 0.0), 1.0, 1e-12);
    }
    ExpectDirichletMoments(rows, 4, alpha);
  }
}

TEST(DirichletSampleTest, AHugeAlphaGivesEqualParts) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 100; ++i)
    for (double x : DirichletSample(5, 1e7, rng)) EXPECT_NEAR(x, 0.2, 1e-3);
}

TEST(DirichletSampleTest, ATinyAlphaPutsAllOnOnePartEachAsOften) {
  // α = 1e-4: most draws underflow altogether (the point-mass branch); nearly all the others have
  // one Gamma draw orders of magnitude above the rest.
  std::mt19937_64 rng(3);
  std::vector<int> wins(5, 0);
  const int draws = 10000;
  int all_on_one = 0;
  double mean_top = 0;
  for (int i = 0; i < draws; ++i) {
    const std::vector<double> p = DirichletSample(5, 1e-4, rng);
    const auto top = std::max_element(p.begin(), p.end());
    all_on_one += *top > 0.999;
    mean_top += *top / draws;
    ++wins[top - p.begin()];
  }
  EXPECT_GT(all_on_one, 0.99 * draws);
  EXPECT_GT(mean_top, 0.995);
  // Symmetric: each part takes all 1/5 of the time (binomial, 5 standard deviations).
  for (int w : wins) EXPECT_NEAR(w, draws / 5.0, 5 * std::sqrt(draws * 0.2 * 0.8));
}

TEST(PerClientLabelProportionsTest, EachClientsMixOverTheLabelsIsADirichletDraw) {
  std::mt19937_64 rng(11);
  const auto rows = PerClientLabelProportions(20000, 6, 0.5, rng);
  ASSERT_EQ(rows.size(), 20000u);
  for (const auto& row : rows) {
    ASSERT_EQ(row.size(), 6u);  // one proportion per label
    ASSERT_NEAR(std::accumulate(row.begin(), row.end(), 0.0), 1.0, 1e-12);
  }
  ExpectDirichletMoments(rows, 6, 0.5);
}

// For one label, client k's fraction of that label's items over many seeds.
std::vector<std::vector<double>> LabelFractions(int items, int clients, double alpha, int seeds) {
  const std::vector<std::string> labels(static_cast<size_t>(items), "only");
  std::vector<std::vector<double>> rows;
  for (int seed = 0; seed < seeds; ++seed) {
    auto split = SplitByLabelShares(labels, clients, alpha, 0, static_cast<uint64_t>(seed));
    EXPECT_TRUE(split.ok()) << split.status();
    std::vector<double> fractions;
    for (const auto& part : *split) fractions.push_back(part.size() / static_cast<double>(items));
    rows.push_back(std::move(fractions));
  }
  return rows;
}

TEST(SplitByLabelSharesTest, EachLabelsClientSharesAreADirichletDraw) {
  // 4000 items of one label: the cut's rounding (at most 1/4000 per client) is far below the
  // tolerances. Client sizes vary: that is the per-label meaning (per-client proportions fix them).
  const auto rows = LabelFractions(4000, 4, 0.5, 3000);
  ExpectDirichletMoments(rows, 4, 0.5);
}

TEST(SplitByLabelSharesTest, EveryItemGoesToExactlyOneClientLabelByLabel) {
  std::vector<std::string> labels;
  for (int i = 0; i < 900; ++i) labels.push_back(std::string(1, static_cast<char>('a' + i % 3)));
  auto split = SplitByLabelShares(labels, 5, 0.3, 1, 42);
  ASSERT_TRUE(split.ok()) << split.status();
  ASSERT_EQ(split->size(), 5u);
  std::vector<int> seen(labels.size(), 0);
  for (const auto& part : *split) {
    EXPECT_GE(part.size(), 1u);
    for (size_t i : part) ++seen.at(i);
  }
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  // Deterministic in the seed; another seed splits otherwise.
  EXPECT_EQ(*SplitByLabelShares(labels, 5, 0.3, 1, 42), *split);
  EXPECT_NE(*SplitByLabelShares(labels, 5, 0.3, 1, 43), *split);
}

TEST(SplitByLabelSharesTest, AHugeAlphaGivesEveryClientItsEqualPartOfEachLabel) {
  std::vector<std::string> labels;
  for (int i = 0; i < 1200; ++i) labels.push_back(i % 3 == 0 ? "x" : i % 3 == 1 ? "y" : "z");
  auto split = SplitByLabelShares(labels, 4, 1e7, 0, 5);
  ASSERT_TRUE(split.ok()) << split.status();
  for (const auto& part : *split) {
    std::map<std::string, int> count;
    for (size_t i : part) ++count[labels[i]];
    for (const char* label : {"x", "y", "z"}) EXPECT_NEAR(count[label], 100, 1) << label;
  }
}

TEST(SplitByLabelSharesTest, ATinyAlphaGivesEachLabelToOneClient) {
  std::vector<std::string> labels;
  for (int i = 0; i < 600; ++i) labels.push_back(std::to_string(i % 6));
  auto split = SplitByLabelShares(labels, 4, 1e-4, 0, 9);
  ASSERT_TRUE(split.ok()) << split.status();
  std::map<std::string, std::set<size_t>> holders;  // label → clients holding any of it
  for (size_t k = 0; k < split->size(); ++k)
    for (size_t i : (*split)[k]) holders[labels[i]].insert(k);
  ASSERT_EQ(holders.size(), 6u);
  for (const auto& [label, clients] : holders) EXPECT_EQ(clients.size(), 1u) << label;
}

TEST(SplitByLabelSharesTest, TooFewItemsForTheMinimumIsAnErrorSayingSo) {
  const std::vector<std::string> labels(10, "a");
  auto split = SplitByLabelShares(labels, 4, 0.5, 5, 1);
  ASSERT_FALSE(split.ok());
  EXPECT_EQ(split.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(split.status().message(),
              HasSubstr("no Dirichlet(0.5) split of 10 records over 4 clients gave each at "
                        "least 5"));
  EXPECT_THAT(split.status().message(), HasSubstr("larger alpha"));
  // A minimum that can be met is met: every returned split honours it.
  const std::vector<std::string> many(400, "a");
  for (uint64_t seed = 0; seed < 20; ++seed) {
    auto ok = SplitByLabelShares(many, 4, 0.5, 20, seed);
    ASSERT_TRUE(ok.ok()) << ok.status();
    for (const auto& part : *ok) EXPECT_GE(part.size(), 20u);
  }
}

}  // namespace
}  // namespace fedlora::common
