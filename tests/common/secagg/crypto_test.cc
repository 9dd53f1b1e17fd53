// Secure aggregation's cryptography against published test vectors (RFC 7748, RFC 5869) and the
// openssl program's AES-256-CTR, and the masking identity: pairwise masks cancel in the sum.
#include "common/secagg/crypto.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "tests/process.h"
#include "tests/scratch_dir.h"

namespace fedlora::secagg {
namespace {

std::string Unhex(std::string_view hex) {
  std::string out;
  for (size_t i = 0; i + 1 < hex.size(); i += 2)
    out += static_cast<char>(std::stoi(std::string(hex.substr(i, 2)), nullptr, 16));
  return out;
}

// RFC 7748, section 6.1.
TEST(CryptoTest, X25519MatchesRfc7748) {
  const std::string alice =
      Unhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
  const std::string bob = Unhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb");
  EXPECT_EQ(*PublicKeyOf(alice),
            Unhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"));
  EXPECT_EQ(*PublicKeyOf(bob),
            Unhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"));
  const std::string shared =
      Unhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742");
  EXPECT_EQ(*Agree(alice, *PublicKeyOf(bob)), shared);
  EXPECT_EQ(*Agree(bob, *PublicKeyOf(alice)), shared);
  // A low-order point gives an all-zero secret, which is refused.
  EXPECT_TRUE(absl::IsInvalidArgument(Agree(alice, std::string(32, '\0')).status()));
  EXPECT_TRUE(absl::IsInvalidArgument(Agree(alice, "short").status()));
  auto a = NewKeyPair(), b = NewKeyPair();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(*Agree(a->private_key, b->public_key), *Agree(b->private_key, a->public_key));
}

// RFC 5869, test case 1.
TEST(CryptoTest, HkdfMatchesRfc5869) {
  const auto okm = Hkdf(std::string(22, '\x0b'), Unhex("000102030405060708090a0b0c"),
                        Unhex("f0f1f2f3f4f5f6f7f8f9"), 42);
  ASSERT_TRUE(okm.ok()) << okm.status();
  EXPECT_EQ(*okm, Unhex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
                        "34007208d5b887185865"));
}

TEST(CryptoTest, SealedSharesOpenOnlyUnchanged) {
  const std::string key(32, 'k'), other(32, 'o');
  auto sealed = Seal(key, "a share of b_u", "round 3 from 1 to 2");
  ASSERT_TRUE(sealed.ok());
  EXPECT_EQ(*Open(key, *sealed, "round 3 from 1 to 2"), "a share of b_u");
  EXPECT_NE(*Seal(key, "a share of b_u", "round 3 from 1 to 2"), *sealed) << "nonce reused";
  EXPECT_TRUE(absl::IsPermissionDenied(Open(other, *sealed, "round 3 from 1 to 2").status()));
  EXPECT_TRUE(absl::IsPermissionDenied(Open(key, *sealed, "round 3 from 2 to 1").status()));
  std::string altered = *sealed;
  altered[14] ^= 1;
  EXPECT_TRUE(absl::IsPermissionDenied(Open(key, altered, "round 3 from 1 to 2").status()));
  EXPECT_TRUE(absl::IsPermissionDenied(Open(key, "tiny", "").status()));
}

// The masks' generator is AES-256-CTR's keystream, as the openssl program computes it.
TEST(CryptoTest, ExpandSeedIsTheAesCtrKeystream) {
  testing::ScratchDir dir;
  const std::string seed =
      Unhex("000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f");
  std::ofstream(dir / "zeros", std::ios::binary) << std::string(64, '\0');
  const auto r =
      testing::RunProgram({"openssl", "enc", "-aes-256-ctr", "-nosalt", "-K",
                           "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
                           "-iv", "00000000000000000000000000000000", "-in",
                           (dir / "zeros").string(), "-out", (dir / "stream").string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const std::string stream = testing::ReadText(dir / "stream");
  ASSERT_EQ(stream.size(), 64u);
  std::vector<uint64_t> words(8), masked(8);
  ASSERT_TRUE(ExpandSeed(seed, 64, words).ok());
  ASSERT_TRUE(ExpandSeed(seed, 20, masked).ok());
  for (size_t i = 0; i < 8; ++i) {
    uint64_t expected = 0;
    for (int k = 7; k >= 0; --k)
      expected = expected << 8 | static_cast<unsigned char>(stream[i * 8 + static_cast<size_t>(k)]);
    EXPECT_EQ(words[i], expected) << i;
    EXPECT_EQ(masked[i], expected & ((1u << 20) - 1)) << i;
  }
  EXPECT_FALSE(ExpandSeed("short", 20, words).ok());
  EXPECT_FALSE(ExpandSeed(seed, 0, words).ok());
}

// Four clients mask their inputs pairwise (u adds PRG(s_uv) for v > u and subtracts it for v < u,
// s_uv from X25519 and HKDF): the masks cancel mod 2^b and the sum is the inputs' sum.
TEST(CryptoTest, PairwiseMasksCancelInTheSum) {
  constexpr int kClients = 4, kBits = 24;
  constexpr size_t kLength = 1000;
  constexpr uint64_t kMod = uint64_t{1} << kBits;
  std::vector<KeyPair> keys;
  for (int u = 0; u < kClients; ++u) keys.push_back(*NewKeyPair());
  std::vector<uint64_t> total(kLength, 0), expected(kLength, 0), mask(kLength);
  for (int u = 0; u < kClients; ++u) {
    std::vector<uint64_t> y(kLength);
    for (size_t i = 0; i < kLength; ++i) y[i] = (u * 7919 + i * 31) % kMod;  // the input
    for (size_t i = 0; i < kLength; ++i) expected[i] = (expected[i] + y[i]) % kMod;
    for (int v = 0; v < kClients; ++v) {
      if (v == u) continue;
      const std::string s = *Hkdf(*Agree(keys[u].private_key, keys[v].public_key), "round 1",
                                  "fedlora secagg pairwise mask", 32);
      ASSERT_TRUE(ExpandSeed(s, kBits, mask).ok());
      for (size_t i = 0; i < kLength; ++i)
        y[i] = (u < v ? y[i] + mask[i] : y[i] + kMod - mask[i]) % kMod;
    }
    for (size_t i = 0; i < kLength; ++i) total[i] = (total[i] + y[i]) % kMod;
  }
  EXPECT_EQ(total, expected);
}

}  // namespace
}  // namespace fedlora::secagg
