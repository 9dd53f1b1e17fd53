#include "common/secagg/params.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <set>

#include "common/secagg/dp.h"

namespace fedlora::secagg {
namespace {

// P(X = x), X hypergeometric, by the product of ratios in long double (not lgamma): `draws` from
// `population` of which `marked` are marked.
long double Pmf(int population, int marked, int draws, int x) {
  if (x < 0 || x > marked || x > draws || draws - x > population - marked) return 0;
  long double p = 1;  // C(marked,x)·C(population−marked,draws−x)/C(population,draws)
  for (int i = 0; i < x; ++i) p *= static_cast<long double>(marked - i) / (x - i);
  for (int i = 0; i < draws - x; ++i)
    p *= static_cast<long double>(population - marked - i) / (draws - x - i);
  for (int i = 0; i < draws; ++i) p *= static_cast<long double>(draws - i) / (population - i);
  return p;
}

// The rules of params.h for degree k and threshold t, with its counts of corrupt and surviving
// clients.
bool SecureAndCorrect(int n, int k, int t, double dropout, double corrupt) {
  const int bad = static_cast<int>(std::floor(corrupt * n + 1e-9));
  const int survivors = n - static_cast<int>(std::ceil(dropout * n - 1e-9));
  const int holders = k + 1;
  long double many_corrupt = 0, few_survivors = 0;
  for (int x = t; x <= holders; ++x) many_corrupt += Pmf(n, bad, holders, x);
  for (int x = 0; x < t; ++x) few_survivors += Pmf(n, survivors, holders, x);
  int a = 0;  // the corrupt holders' 2^−41/n bound
  long double tail = 0;
  for (int x = holders; x >= 0; --x) {
    if (tail + Pmf(n, bad, holders, x) > std::pow(2.0L, -41) / n) {
      a = x;
      break;
    }
    tail += Pmf(n, bad, holders, x);
  }
  return many_corrupt <= std::pow(2.0L, -41) / n && 2 * t > holders + a &&
         few_survivors <= std::pow(2.0L, -20) / n;
}

// Small cohorts take the complete graph; its threshold, by hand: ⌊(n + ⌊γn⌋)/2⌋ + 1.
TEST(ChooseGraphTest, SmallCohortsUseTheCompleteGraph) {
  auto g = ChooseGraph(3, 0.05, 0.05);
  ASSERT_TRUE(g.ok()) << g.status();
  EXPECT_EQ(g->neighbours, 2);
  EXPECT_EQ(g->threshold, 2);  // ⌊(3 + 0)/2⌋ + 1
  EXPECT_EQ(g->tolerated(), 1);
  EXPECT_TRUE(g->complete());
  g = ChooseGraph(3, 0.05, 0.34);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->threshold, 3);  // ⌊(3 + 1)/2⌋ + 1: one corrupt client
  // Ten clients, one of them dropping (⌈0.5⌉) and one corrupt: 4 neighbours with t = 4 (2t > 5
  // holders + 1 corrupt) still have 4 holders after the drop; 2 neighbours (3 holders, t = 3) would
  // fail whenever the dropped client is a holder (3 times in 10).
  g = ChooseGraph(10, 0.05, 0.1);
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(g->neighbours, 4);
  EXPECT_EQ(g->threshold, 4);
  EXPECT_EQ(ChooseGraph(2, 0, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChooseGraph(100, 0.5, 0).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ChooseGraph(100, 0.1, 1).status().code(), absl::StatusCode::kInvalidArgument);
}

// Large cohorts get a sparse graph that meets every rule, at the smallest such degree, and whose
// degree grows like log n: SecAgg+'s point.
TEST(ChooseGraphTest, LargeCohortsGetTheSmallestSecureDegree) {
  int last = 0;
  for (int n : {1000, 3000, 10000}) {
    auto g = ChooseGraph(n, 0.05, 0.05);
    ASSERT_TRUE(g.ok()) << g.status();
    EXPECT_FALSE(g->complete()) << n;
    EXPECT_EQ(g->neighbours % 2, 0);
    EXPECT_TRUE(SecureAndCorrect(n, g->neighbours, g->threshold, 0.05, 0.05)) << n;
    bool smaller = false;  // no smaller degree has a threshold that meets the rules
    for (int t = 2; t <= g->neighbours - 1; ++t)
      smaller |= SecureAndCorrect(n, g->neighbours - 2, t, 0.05, 0.05);
    EXPECT_FALSE(smaller) << n;
    EXPECT_GT(g->neighbours, last);
    last = g->neighbours;
    std::cout << n << " clients: " << g->neighbours << " neighbours, threshold " << g->threshold
              << "\n";
  }
  EXPECT_LT(last, 10000 / 10);  // at 10^4 each client talks to a few percent of the cohort
}

// The ring is a permutation; neighbourhoods are symmetric, k each, and never hold the client.
TEST(NeighboursTest, RingNeighbourhoodsAreSymmetric) {
  const std::string seed(32, 'r');
  const GraphParams g{50, 8, 5};
  auto ring = RingOrder(50, seed);
  ASSERT_TRUE(ring.ok());
  EXPECT_EQ(std::set<int>(ring->begin(), ring->end()).size(), 50u);
  EXPECT_EQ(*RingOrder(50, seed), *ring);  // the seed fixes it
  EXPECT_NE(*RingOrder(50, std::string(32, 's')), *ring);
  for (int u = 0; u < 50; ++u) {
    const std::vector<int> nu = Neighbours(g, *ring, u);
    ASSERT_EQ(nu.size(), 8u);
    EXPECT_FALSE(std::binary_search(nu.begin(), nu.end(), u));
    for (int v : nu) {
      const std::vector<int> nv = Neighbours(g, *ring, v);
      EXPECT_TRUE(std::binary_search(nv.begin(), nv.end(), u)) << u << " " << v;
      const int gap = std::abs((*ring)[u] - (*ring)[v]);
      EXPECT_LE(std::min(gap, 50 - gap), 4);  // within k/2 places on the ring
    }
  }
  EXPECT_EQ(Neighbours(GraphParams{4, 3, 3}, *RingOrder(4, seed), 2), (std::vector<int>{0, 1, 3}));
}

// The plan's bits hold the worst sum: summands·clamp plus the noise tail below 2^(bits−1), and
// one bit fewer would not; sums of clamped, rounded, rotated updates never wrap.
TEST(PlanQuantisationTest, TheSumFitsTheBits) {
  for (double z : {0.0, 1.0}) {
    for (int summands : {3, 1000}) {
      auto q = PlanQuantisation(3000, 0.5, z, summands, summands);
      ASSERT_TRUE(q.ok()) << q.status();
      EXPECT_EQ(q->rotated, 4096u);
      const double tail = z > 0 ? std::sqrt(2 * summands * q->local_sigma() * q->local_sigma() *
                                            (41 * std::log(2.0) + std::log(4096.0)))
                                : 0;
      const double largest = summands * static_cast<double>(q->clamp) + tail;
      EXPECT_LT(largest, std::ldexp(1.0, q->bits - 1)) << q->Describe();
      EXPECT_GE(largest + 1, std::ldexp(1.0, q->bits - 2)) << q->Describe();
      if (z > 0) {  // each client's σ is z·clip/√expected in real units
        EXPECT_NEAR(q->local_sigma() / q->scale, z * 0.5 / std::sqrt(summands), 1e-6);
        EXPECT_LE(q->local_sigma(), std::ldexp(1.0, 20) * 1.0001);
      } else {  // rounding 2^16 finer than a typical coordinate
        EXPECT_DOUBLE_EQ(q->scale, std::ldexp(64.0, 16) / 0.5);
      }
      EXPECT_DOUBLE_EQ(q->l2_sensitivity(), 0.5 * q->scale + 64);
    }
  }
  // A unit vector on one axis, rotated, is spread to ±1/64: far within the clamp.
  auto q = PlanQuantisation(4096, 1, 0, 1, 3);
  std::vector<double> x(4096, 0.0);
  x[17] = 1;
  auto r = Rotate(x, std::string(32, 'k'));
  ASSERT_TRUE(r.ok());
  for (double v : *r) EXPECT_LT(std::abs(v) * q->scale + 1, static_cast<double>(q->clamp));
  EXPECT_EQ(PlanQuantisation(0, 1, 0, 1, 3).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedlora::secagg
