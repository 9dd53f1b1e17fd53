#include "common/secagg/crypto.h"

#include <openssl/core_names.h>
#include <openssl/evp.h>
#include <openssl/kdf.h>
#include <openssl/rand.h>

#include <algorithm>
#include <cstring>
#include <memory>

#include "common/base/openssl_util.h"
#include "common/base/strings.h"

namespace fedlora::secagg {
namespace {

using common::openssl::Bytes;

using common::StrCat;

using common::openssl::Deleter;
using Pkey = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using PkeyCtx = std::unique_ptr<EVP_PKEY_CTX, Deleter<EVP_PKEY_CTX_free>>;
using CipherCtx = std::unique_ptr<EVP_CIPHER_CTX, Deleter<EVP_CIPHER_CTX_free>>;

constexpr size_t kNonceBytes = 12, kTagBytes = 16;

absl::Status Failed(std::string_view what) {
  return absl::InternalError(StrCat("OpenSSL could not ", what));
}

absl::Status CheckKey(std::string_view key, std::string_view what) {
  if (key.size() == kKeyBytes) return absl::OkStatus();
  return absl::InvalidArgumentError(
      StrCat(what, " of ", key.size(), " bytes; expected ", kKeyBytes));
}

}  // namespace

absl::StatusOr<std::string> RandomBytes(size_t n) {
  std::string s(n, '\0');
  if (RAND_priv_bytes(reinterpret_cast<unsigned char*>(s.data()), static_cast<int>(n)) != 1)
    return Failed("draw random bytes");
  return s;
}

std::string Sha256(std::string_view bytes) {
  std::string out(32, '\0');
  unsigned int size = 0;
  EVP_Digest(bytes.data(), bytes.size(), reinterpret_cast<unsigned char*>(out.data()), &size,
             EVP_sha256(), nullptr);
  return out;
}

absl::StatusOr<KeyPair> NewKeyPair() {
  std::string private_key(kKeyBytes, '\0');
  if (RAND_priv_bytes(reinterpret_cast<unsigned char*>(private_key.data()), kKeyBytes) != 1)
    return Failed("draw a private key");
  auto public_key = PublicKeyOf(private_key);
  if (!public_key.ok()) return public_key.status();
  return KeyPair{std::move(private_key), *std::move(public_key)};
}

absl::StatusOr<std::string> PublicKeyOf(std::string_view private_key) {
  if (absl::Status st = CheckKey(private_key, "an X25519 private key"); !st.ok()) return st;
  Pkey key(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, Bytes(private_key),
                                        private_key.size()));
  std::string out(kKeyBytes, '\0');
  size_t size = out.size();
  if (!key ||
      EVP_PKEY_get_raw_public_key(key.get(), reinterpret_cast<unsigned char*>(out.data()), &size) !=
          1 ||
      size != kKeyBytes)
    return Failed("derive an X25519 public key");
  return out;
}

absl::StatusOr<std::string> Agree(std::string_view private_key, std::string_view peer_public_key) {
  if (absl::Status st = CheckKey(private_key, "an X25519 private key"); !st.ok()) return st;
  if (absl::Status st = CheckKey(peer_public_key, "an X25519 public key"); !st.ok()) return st;
  Pkey mine(EVP_PKEY_new_raw_private_key(EVP_PKEY_X25519, nullptr, Bytes(private_key),
                                         private_key.size()));
  Pkey peer(EVP_PKEY_new_raw_public_key(EVP_PKEY_X25519, nullptr, Bytes(peer_public_key),
                                        peer_public_key.size()));
  if (!mine || !peer) return Failed("read X25519 keys");
  PkeyCtx ctx(EVP_PKEY_CTX_new(mine.get(), nullptr));
  std::string secret(kKeyBytes, '\0');
  size_t size = secret.size();
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_derive_set_peer(ctx.get(), peer.get()) != 1 ||
      EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(secret.data()), &size) != 1 ||
      size != kKeyBytes)
    return absl::InvalidArgumentError(
        "X25519 agreement failed: the peer's public key is malformed or of low order");
  return secret;
}

absl::StatusOr<std::string> Hkdf(std::string_view ikm, std::string_view salt, std::string_view info,
                                 size_t length) {
  PkeyCtx ctx(EVP_PKEY_CTX_new_id(EVP_PKEY_HKDF, nullptr));
  std::string out(length, '\0');
  size_t size = length;
  if (!ctx || EVP_PKEY_derive_init(ctx.get()) != 1 ||
      EVP_PKEY_CTX_set_hkdf_md(ctx.get(), EVP_sha256()) != 1 ||
      EVP_PKEY_CTX_set1_hkdf_salt(ctx.get(), Bytes(salt), static_cast<int>(salt.size())) != 1 ||
      EVP_PKEY_CTX_set1_hkdf_key(ctx.get(), Bytes(ikm), static_cast<int>(ikm.size())) != 1 ||
      EVP_PKEY_CTX_add1_hkdf_info(ctx.get(), Bytes(info), static_cast<int>(info.size())) != 1 ||
      EVP_PKEY_derive(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &size) != 1 ||
      size != length)
    return Failed("derive a key with HKDF");
  return out;
}

absl::StatusOr<std::string> Seal(std::string_view key, std::string_view plaintext,
                                 std::string_view aad) {
  if (absl::Status st = CheckKey(key, "an AES-256-GCM key"); !st.ok()) return st;
  std::string out(kNonceBytes + plaintext.size() + kTagBytes, '\0');
  auto* o = reinterpret_cast<unsigned char*>(out.data());
  if (RAND_bytes(o, kNonceBytes) != 1) return Failed("draw a nonce");
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  int n = 0;
  if (!ctx || EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, Bytes(key), o) != 1 ||
      EVP_EncryptUpdate(ctx.get(), nullptr, &n, Bytes(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_EncryptUpdate(ctx.get(), o + kNonceBytes, &n, Bytes(plaintext),
                        static_cast<int>(plaintext.size())) != 1 ||
      EVP_EncryptFinal_ex(ctx.get(), o + kNonceBytes + n, &n) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_GET_TAG, kTagBytes,
                          o + kNonceBytes + plaintext.size()) != 1)
    return Failed("encrypt with AES-256-GCM");
  return out;
}

absl::StatusOr<std::string> Open(std::string_view key, std::string_view sealed,
                                 std::string_view aad) {
  if (absl::Status st = CheckKey(key, "an AES-256-GCM key"); !st.ok()) return st;
  if (sealed.size() < kNonceBytes + kTagBytes)
    return absl::PermissionDeniedError(StrCat("a sealed message of ", sealed.size(),
                                              " bytes; at least ", kNonceBytes + kTagBytes));
  const size_t size = sealed.size() - kNonceBytes - kTagBytes;
  std::string out(size, '\0');
  const unsigned char* s = Bytes(sealed);
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  int n = 0;
  std::string tag(sealed.substr(kNonceBytes + size));
  if (!ctx || EVP_DecryptInit_ex(ctx.get(), EVP_aes_256_gcm(), nullptr, Bytes(key), s) != 1 ||
      EVP_DecryptUpdate(ctx.get(), nullptr, &n, Bytes(aad), static_cast<int>(aad.size())) != 1 ||
      EVP_DecryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(out.data()), &n,
                        s + kNonceBytes, static_cast<int>(size)) != 1 ||
      EVP_CIPHER_CTX_ctrl(ctx.get(), EVP_CTRL_GCM_SET_TAG, kTagBytes, tag.data()) != 1)
    return Failed("decrypt with AES-256-GCM");
  if (EVP_DecryptFinal_ex(ctx.get(), reinterpret_cast<unsigned char*>(out.data()) + n, &n) != 1)
    return absl::PermissionDeniedError(
        "a sealed message does not authenticate: altered, or sealed under another key");
  return out;
}

absl::Status ExpandSeed(std::string_view seed, int bits, std::span<uint64_t> out) {
  if (absl::Status st = CheckKey(seed, "a mask seed"); !st.ok()) return st;
  if (bits < 1 || bits > 64)
    return absl::InvalidArgumentError(StrCat("masks of ", bits, " bits; expected 1 to 64"));
  static constexpr unsigned char kZeroIv[16] = {};
  CipherCtx ctx(EVP_CIPHER_CTX_new());
  if (!ctx || EVP_EncryptInit_ex(ctx.get(), EVP_aes_256_ctr(), nullptr, Bytes(seed), kZeroIv) != 1)
    return Failed("start AES-256-CTR");
  // The keystream: AES-CTR of zeros, in blocks of at most 1 MiB.
  constexpr size_t kWords = 1 << 17;
  static const std::string zeros(kWords * sizeof(uint64_t), '\0');
  const uint64_t mask = bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
  for (size_t at = 0; at < out.size(); at += kWords) {
    const size_t words = std::min(kWords, out.size() - at);
    int n = 0;
    if (EVP_EncryptUpdate(ctx.get(), reinterpret_cast<unsigned char*>(out.data() + at), &n,
                          Bytes(zeros), static_cast<int>(words * sizeof(uint64_t))) != 1)
      return Failed("expand a seed");
    for (size_t i = at; i < at + words; ++i) {  // little-endian, whatever the machine's order
      unsigned char b[8];
      std::memcpy(b, &out[i], sizeof b);
      uint64_t w = 0;
      for (int k = 7; k >= 0; --k) w = (w << 8) | b[k];
      out[i] = w & mask;
    }
  }
  return absl::OkStatus();
}

}  // namespace fedlora::secagg
