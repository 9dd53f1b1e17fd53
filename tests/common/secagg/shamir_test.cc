#include "common/secagg/shamir.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/rand.h>

namespace fedlora::secagg {
namespace {

std::string RandomSecret(size_t n) {
  std::string s(n, '\0');
  RAND_bytes(reinterpret_cast<unsigned char*>(s.data()), static_cast<int>(n));
  return s;
}

// Every subset of `t` of the 7 shares gives the secret back, in any order.
TEST(ShamirTest, AnyThresholdSharesReconstruct) {
  for (int t : {1, 3, 7}) {
    const std::string secret = RandomSecret(32);
    auto shares = ShamirSplit(secret, t, 7);
    ASSERT_TRUE(shares.ok()) << shares.status();
    ASSERT_EQ(shares->size(), 7u);
    for (unsigned mask = 0; mask < 128; ++mask) {
      if (__builtin_popcount(mask) != t) continue;
      std::vector<Share> subset;
      for (int i = 6; i >= 0; --i)  // highest point first: order does not matter
        if (mask >> i & 1) subset.push_back((*shares)[static_cast<size_t>(i)]);
      auto back = ShamirCombine(subset, t, 32);
      ASSERT_TRUE(back.ok()) << back.status();
      EXPECT_EQ(*back, secret) << "t " << t << " subset " << mask;
    }
  }
  // The largest secret, with leading zero bytes kept.
  const std::string secret = std::string(3, '\0') + RandomSecret(61);
  auto shares = ShamirSplit(secret, 2, 3);
  ASSERT_TRUE(shares.ok());
  EXPECT_EQ(*ShamirCombine(*shares, 2, 64), secret);
}

// t − 1 shares are refused; read as a degree t − 2 polynomial they give a value unrelated to the
// secret (a uniformly random field element, never a 32-byte secret in practice), and an altered
// share gives nothing either.
TEST(ShamirTest, FewerSharesOrAnAlteredOneGiveNothing) {
  const std::string secret = RandomSecret(32);
  auto shares = ShamirSplit(secret, 4, 6);
  ASSERT_TRUE(shares.ok());
  const std::vector<Share> three(shares->begin(), shares->begin() + 3);
  EXPECT_TRUE(absl::IsInvalidArgument(ShamirCombine(three, 4, 32).status()));
  const auto guess = ShamirCombine(three, 3, 32);
  EXPECT_TRUE(!guess.ok() || *guess != secret);
  std::vector<Share> altered(shares->begin(), shares->begin() + 4);
  altered[1].y[40] ^= 1;
  const auto wrong = ShamirCombine(altered, 4, 32);
  EXPECT_TRUE(!wrong.ok() || *wrong != secret);
  // Malformed input is refused with what was expected.
  std::vector<Share> repeated = {(*shares)[0], (*shares)[0], (*shares)[1], (*shares)[2]};
  EXPECT_THAT(std::string(ShamirCombine(repeated, 4, 32).status().message()),
              ::testing::HasSubstr("distinct points"));
  EXPECT_FALSE(ShamirSplit(secret, 0, 3).ok());
  EXPECT_FALSE(ShamirSplit(secret, 4, 3).ok());
  EXPECT_FALSE(ShamirSplit(std::string(65, 'x'), 2, 3).ok());
}

}  // namespace
}  // namespace fedlora::secagg
