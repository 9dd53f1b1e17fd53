// Cohort sampling and the quorum count, against hand-worked cases.
#include "server/cohort.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <set>

namespace fedlora::server {
namespace {

TEST(QuorumTest, IsAFractionOfTheMembersRoundedUpForgivingAQuorumWrittenToTwoDecimals) {
  EXPECT_EQ(QuorumOf(0.67, 3), 2u);  // 2.01: two of three, as meant
  EXPECT_EQ(QuorumOf(0.5, 3), 2u);   // 1.5
  EXPECT_EQ(QuorumOf(0.34, 3), 1u);  // 1.02
  EXPECT_EQ(QuorumOf(0.1, 30), 3u);  // 3.0000000000000004 in double
  EXPECT_EQ(QuorumOf(1.0, 3), 3u);
  EXPECT_EQ(QuorumOf(1.0, 200), 200u);  // all means all, however many
  EXPECT_EQ(QuorumOf(0.9, 10), 9u);
  EXPECT_EQ(QuorumOf(0.91, 10), 10u);  // 9.1: a tenth of a member is not forgiven
  EXPECT_EQ(QuorumOf(0.6, 0), 1u);     // never 0: a round needs an update
}

TEST(CohortTest, TakesTheFractionRoundedUpSortedAndRepeatsForTheSameSeedRoundAndAttempt) {
  const std::vector<std::string> ids = {"e", "a", "d", "b", "c"};
  const auto cohort = SampleCohort(ids, 7, 1, 0, 0.5, 1);
  ASSERT_EQ(cohort.size(), 3u);  // ⌈2.5⌉
  EXPECT_TRUE(std::is_sorted(cohort.begin(), cohort.end()));
  for (const std::string& id : cohort) EXPECT_NE(std::find(ids.begin(), ids.end(), id), ids.end());
  EXPECT_EQ(SampleCohort(ids, 7, 1, 0, 0.5, 1), cohort);
  // The candidates' order does not matter, and min_cohort raises the size up to all of them.
  EXPECT_EQ(SampleCohort({"a", "b", "c", "d", "e"}, 7, 1, 0, 0.5, 1), cohort);
  EXPECT_EQ(SampleCohort(ids, 7, 1, 0, 0.1, 4).size(), 4u);
  EXPECT_EQ(SampleCohort(ids, 7, 1, 0, 0.1, 9).size(), 5u);
  // Other rounds and attempts draw other cohorts (over 20 draws, more than one cohort appears).
  std::set<std::vector<std::string>> seen;
  for (int attempt = 0; attempt < 20; ++attempt)
    seen.insert(SampleCohort(ids, 7, 1, attempt, 0.4, 1));
  EXPECT_GT(seen.size(), 1u);
}

}  // namespace
}  // namespace fedlora::server
