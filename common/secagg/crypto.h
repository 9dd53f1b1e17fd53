// The cryptography of secure aggregation (ALGORITHMS.md, "Secure aggregation"), all of it OpenSSL
// 3's: X25519 key agreement, HKDF-SHA256, AES-256-GCM for the shares sent through the coordinator,
// and AES-256-CTR as the pseudo-random generator that expands a 32-byte seed into masks.
#ifndef FEDLORA_COMMON_SECAGG_CRYPTO_H_
#define FEDLORA_COMMON_SECAGG_CRYPTO_H_

#include <cstdint>
#include <span>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace fedlora::secagg {

inline constexpr size_t kKeyBytes = 32;

// An X25519 key pair, raw 32-byte encodings (RFC 7748).
struct KeyPair {
  std::string private_key;
  std::string public_key;
};
absl::StatusOr<KeyPair> NewKeyPair();
// The public key of a raw private key.
absl::StatusOr<std::string> PublicKeyOf(std::string_view private_key);
// The X25519 shared secret of `private_key` and `peer_public_key`: the same from both sides.
// INVALID_ARGUMENT for a malformed or low-order peer key (an all-zero secret).
absl::StatusOr<std::string> Agree(std::string_view private_key, std::string_view peer_public_key);

// `n` bytes from OpenSSL's private random generator (seeds, nonces of instances).
absl::StatusOr<std::string> RandomBytes(size_t n);

// SHA-256 of `bytes` (32 raw bytes).
std::string Sha256(std::string_view bytes);

// HKDF-SHA256 (RFC 5869) of `ikm`: `length` bytes.
absl::StatusOr<std::string> Hkdf(std::string_view ikm, std::string_view salt, std::string_view info,
                                 size_t length);

// AES-256-GCM under a 32-byte key: nonce (12 random bytes) ‖ ciphertext ‖ tag (16), with `aad`
// authenticated. Open refuses (PERMISSION_DENIED) anything altered or made under another key or
// aad.
absl::StatusOr<std::string> Seal(std::string_view key, std::string_view plaintext,
                                 std::string_view aad);
absl::StatusOr<std::string> Open(std::string_view key, std::string_view sealed,
                                 std::string_view aad);

// The pseudo-random generator of masks: AES-256-CTR under `seed` (32 bytes) from a zero counter,
// read as little-endian 64-bit words, each reduced mod 2^bits (1 <= bits <= 64). The same seed
// gives the same words on every machine.
absl::Status ExpandSeed(std::string_view seed, int bits, std::span<uint64_t> out);

// 2^bits − 1: the words of `bits` bits (1 <= bits <= 64) are those it masks.
constexpr uint64_t WordMask(int bits) {
  return bits == 64 ? ~uint64_t{0} : (uint64_t{1} << bits) - 1;
}

}  // namespace fedlora::secagg

#endif  // FEDLORA_COMMON_SECAGG_CRYPTO_H_
