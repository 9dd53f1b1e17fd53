#include "common/secagg/shamir.h"

#include <openssl/bn.h>

#include <algorithm>
#include <memory>
#include <set>

#include "common/base/openssl_util.h"
#include "common/base/strings.h"

namespace fedlora::secagg {
namespace {

using common::StrCat;

constexpr int kShareLen = static_cast<int>(kShareBytes);

using Bn = std::unique_ptr<BIGNUM, common::openssl::Deleter<BN_clear_free>>;  // secrets: cleared
using BnCtx = std::unique_ptr<BN_CTX, common::openssl::Deleter<BN_CTX_free>>;

Bn New() { return Bn(BN_new()); }

// p = 2^521 − 1, a Mersenne prime.
const BIGNUM* Prime() {
  static const BIGNUM* p = [] {
    BIGNUM* b = BN_new();
    BN_set_bit(b, 521);
    BN_sub_word(b, 1);
    return b;
  }();
  return p;
}

absl::Status Failed(const char* what) {
  return absl::InternalError(StrCat("OpenSSL could not ", what));
}

}  // namespace

absl::StatusOr<std::vector<Share>> ShamirSplit(std::string_view secret, int threshold, int count) {
  if (count < 0 || count > 65535)
    return absl::InvalidArgumentError(StrCat(count, " shares; expected at most 65535"));
  std::vector<uint32_t> points(static_cast<size_t>(count));
  for (int k = 0; k < count; ++k) points[static_cast<size_t>(k)] = static_cast<uint32_t>(k + 1);
  return ShamirSplit(secret, threshold, points);
}

absl::StatusOr<std::vector<Share>> ShamirSplit(std::string_view secret, int threshold,
                                               std::span<const uint32_t> points) {
  if (secret.size() > kMaxSecretBytes)
    return absl::InvalidArgumentError(
        StrCat("a secret of ", secret.size(), " bytes; at most ", kMaxSecretBytes));
  const int count = static_cast<int>(points.size());
  if (threshold < 1 || threshold > count || count > 65535)
    return absl::InvalidArgumentError(StrCat("threshold ", threshold, " of ", count,
                                             " shares; expected 1 <= threshold <= count <= 65535"));
  if (std::set<uint32_t>(points.begin(), points.end()).size() != points.size() ||
      *std::min_element(points.begin(), points.end()) == 0 ||
      *std::max_element(points.begin(), points.end()) > 65535)
    return absl::InvalidArgumentError("share points must be distinct and in 1..65535");
  BnCtx ctx(BN_CTX_secure_new());
  // f(x) = secret + c1·x + … + c_{t−1}·x^{t−1} mod p
  std::vector<Bn> coeffs;
  coeffs.push_back(Bn(BN_bin2bn(reinterpret_cast<const unsigned char*>(secret.data()),
                                static_cast<int>(secret.size()), nullptr)));
  for (int i = 1; i < threshold; ++i) {
    coeffs.push_back(New());
    if (!coeffs.back() || BN_priv_rand_range(coeffs.back().get(), Prime()) != 1)
      return Failed("draw a coefficient");
  }
  if (!ctx || !coeffs[0]) return Failed("start");
  std::vector<Share> shares;
  Bn y = New(), x = New();
  for (const uint32_t k : points) {
    // Horner's rule, highest coefficient first.
    if (!BN_set_word(x.get(), static_cast<BN_ULONG>(k)) || !BN_copy(y.get(), coeffs.back().get()))
      return Failed("evaluate");
    for (int i = threshold - 2; i >= 0; --i) {
      if (!BN_mod_mul(y.get(), y.get(), x.get(), Prime(), ctx.get()) ||
          !BN_mod_add(y.get(), y.get(), coeffs[static_cast<size_t>(i)].get(), Prime(), ctx.get()))
        return Failed("evaluate");
    }
    Share s{k, std::string(kShareBytes, '\0')};
    if (BN_bn2binpad(y.get(), reinterpret_cast<unsigned char*>(s.y.data()), kShareLen) != kShareLen)
      return Failed("write a share");
    shares.push_back(std::move(s));
  }
  return shares;
}

absl::StatusOr<std::string> ShamirCombine(std::span<const Share> shares, int threshold,
                                          size_t secret_size) {
  if (threshold < 1 || shares.size() < static_cast<size_t>(threshold))
    return absl::InvalidArgumentError(
        StrCat(shares.size(), " shares; the secret needs ", threshold));
  if (secret_size > kMaxSecretBytes)
    return absl::InvalidArgumentError(
        StrCat("a secret of ", secret_size, " bytes; at most ", kMaxSecretBytes));
  const std::span<const Share> used = shares.first(static_cast<size_t>(threshold));
  std::set<uint32_t> points;
  for (const Share& s : used) {
    if (s.x == 0 || s.x > 65535 || s.y.size() != kShareBytes || !points.insert(s.x).second)
      return absl::InvalidArgumentError(StrCat("share at point ", s.x,
                                               ": expected distinct points 1..65535 and ",
                                               kShareBytes, "-byte values"));
  }
  BnCtx ctx(BN_CTX_secure_new());
  Bn sum = New(), term = New(), num = New(), den = New(), xi = New(), xj = New(), diff = New();
  if (!ctx || !sum || !term || !num || !den || !xi || !xj || !diff) return Failed("start");
  BN_zero(sum.get());
  // f(0) = Σ_i y_i · Π_{j≠i} x_j / (x_j − x_i)  (mod p)
  for (const Share& si : used) {
    Bn yi(BN_bin2bn(reinterpret_cast<const unsigned char*>(si.y.data()), kShareLen, nullptr));
    if (!yi || BN_cmp(yi.get(), Prime()) >= 0)
      return absl::InvalidArgumentError(StrCat("share at point ", si.x, " is not in the field"));
    BN_one(num.get());
    BN_one(den.get());
    BN_set_word(xi.get(), si.x);
    for (const Share& sj : used) {
      if (sj.x == si.x) continue;
      BN_set_word(xj.get(), sj.x);
      if (!BN_mod_mul(num.get(), num.get(), xj.get(), Prime(), ctx.get()) ||
          !BN_mod_sub(diff.get(), xj.get(), xi.get(), Prime(), ctx.get()) ||
          !BN_mod_mul(den.get(), den.get(), diff.get(), Prime(), ctx.get()))
        return Failed("interpolate");
    }
    if (!BN_mod_inverse(den.get(), den.get(), Prime(), ctx.get()) ||
        !BN_mod_mul(term.get(), yi.get(), num.get(), Prime(), ctx.get()) ||
        !BN_mod_mul(term.get(), term.get(), den.get(), Prime(), ctx.get()) ||
        !BN_mod_add(sum.get(), sum.get(), term.get(), Prime(), ctx.get()))
      return Failed("interpolate");
  }
  if (BN_num_bytes(sum.get()) > static_cast<int>(secret_size))
    return absl::DataLossError(StrCat("the shares do not interpolate to a secret of ", secret_size,
                                      " bytes: shares of different secrets, or "
                                      "altered"));
  std::string secret(secret_size, '\0');
  if (BN_bn2binpad(sum.get(), reinterpret_cast<unsigned char*>(secret.data()),
                   static_cast<int>(secret_size)) != static_cast<int>(secret_size))
    return Failed("write the secret");
  return secret;
}

}  // namespace fedlora::secagg
