// One secure aggregation instance (SecAgg+, Bell et al. 2020, with its consistency round; the
// complete graph is SecAgg, Bonawitz et al. 2017), both sides, with no transport in them: the
// coordinator's engine and the client node carry the messages (fedlora.v1.SecAgg*).
//
//   R0 AdvertiseKeys  each client: two fresh X25519 key pairs (c for the shares' encryption, s for
//                     the pairwise masks) and a self-mask seed b; signs (instance, c, s, H(b)) with
//                     its TLS key. Keyed set U1.
//   R1 ShareKeys      each client checks its neighbours' signatures and certificates, Shamir-shares
//                     b and s_sk t-of-(k+1) among them and itself, and seals each neighbour's
//                     shares with AES-GCM under HKDF(X25519(c_u, c_v)). Sharing set U2.
//   R2 MaskedInput    each client adds to its quantised update PRG(b) and ±PRG(HKDF(X25519(s_u,
//                     s_v))) for each neighbour v in U2 (+ when u < v), mod 2^bits. The coordinator
//                     keeps only the running sum. Masked set U3.
//   R3 Consistency    each client in U3 signs (instance, U3 as shown to it). Consenting set U4.
//   R4 Unmasking      each client checks t of its holders' consents over the same U3, then reveals,
//                     for each neighbour v that shared with it, b_v's share if v ∈ U3, s_v's if not
//                     — never both. The coordinator reconstructs b_u (checked against H(b_u)) for
//                     u ∈ U3 and s_v (checked against its public key) for v ∈ U2 \ U3, and removes
//                     their masks.
//
// Any violation a client sees (a bad signature, a certificate of the wrong name, a share it cannot
// open, too few neighbours or consents, survivor sets that differ) ends its part with an error and
// reveals nothing. A coordinator that cannot unmask someone returns an error and no sum: the round
// is retried, never committed wrong.
#ifndef FEDLORA_COMMON_SECAGG_PROTOCOL_H_
#define FEDLORA_COMMON_SECAGG_PROTOCOL_H_

#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/secagg/identity.h"
#include "common/secagg/params.h"
#include "common/secagg/shamir.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::secagg {

namespace v1 = ::fedlora::v1;

// A config checked and its graph laid out: who is whose neighbour.
class Instance {
 public:
  // INVALID_ARGUMENT, saying what, for a config that is not a protocol instance: an unsorted or
  // repeated cohort, a threshold outside [2, k + 1], bits outside [1, 62], missing seeds.
  static absl::StatusOr<Instance> Create(v1::SecAggConfig config);

  const v1::SecAggConfig& config() const { return config_; }
  int size() const { return config_.cohort_size(); }
  int threshold() const { return config_.threshold(); }
  size_t words() const;                        // the masked vector's length: the rotated length
  int IndexOf(std::string_view client) const;  // −1 for a stranger
  const std::string& Name(int index) const { return config_.cohort(index); }
  const std::vector<int>& NeighboursOf(int index) const { return neighbours_[index]; }
  bool AreNeighbours(int a, int b) const;

 private:
  v1::SecAggConfig config_;
  std::vector<std::vector<int>> neighbours_;  // ascending
};

class ClientSession {
 public:
  // `self` must be in the config's cohort.
  static absl::StatusOr<ClientSession> Create(const v1::SecAggConfig& config, std::string self,
                                              Signer signer, PeerVerifier verifier);

  absl::StatusOr<v1::SecAggKeys> AdvertiseKeys();
  absl::StatusOr<v1::SecAggShares> ShareKeys(const v1::SecAggRoster& roster);
  // `input`: the quantised update, words() values below 2^bits.
  absl::StatusOr<std::vector<uint64_t>> MaskInput(const v1::SecAggShares& inbox,
                                                  std::span<const uint64_t> input);
  absl::StatusOr<v1::SecAggConsent> Consent(const v1::SecAggSurvivors& survivors);
  absl::StatusOr<v1::SecAggReveal> Unmask(const v1::SecAggConsents& consents);

  const Instance& instance() const { return instance_; }

 private:
  enum class Phase { kKeys, kShares, kInput, kConsent, kUnmask, kDone, kFailed };
  struct Peer {
    v1::SecAggKeys keys;
    std::string self_mask_share, mask_key_share;  // what it sealed to this client (R2)
    bool shared = false;
  };
  ClientSession(Instance instance, std::string self, Signer signer, PeerVerifier verifier);
  absl::Status Enter(Phase phase);
  absl::Status Fail(absl::Status status);

  Instance instance_;
  std::string self_;
  int index_ = -1;
  Signer signer_;
  PeerVerifier verifier_;
  Phase phase_ = Phase::kKeys;
  std::string cipher_key_, mask_key_, self_mask_;  // private
  std::string self_mask_share_;                    // this client's own shares
  v1::SecAggKeys own_keys_;
  std::map<std::string, Peer> peers_;  // neighbours that advertised
  std::vector<std::string> survivors_;
};

class ServerSession {
 public:
  // The keys' certificates are checked against `verifier`'s CA too, so junk is refused early.
  static absl::StatusOr<ServerSession> Create(const v1::SecAggConfig& config,
                                              PeerVerifier verifier);
  // Each Add refuses (INVALID_ARGUMENT / PERMISSION_DENIED, saying what) a message that is not
  // what the phase expects of that client, and FAILED_PRECONDITION out of its phase; a refused
  // message changes nothing. Each Close ends a phase; FAILED_PRECONDITION when too few clients
  // remain for the protocol to finish (the round is retried).
  absl::Status AddKeys(const std::string& client, v1::SecAggKeys keys);  // keys.certificate set
  absl::Status CloseKeys();
  absl::StatusOr<v1::SecAggRoster> RosterFor(const std::string& client) const;
  absl::Status AddShares(const std::string& client, const v1::SecAggShares& shares);
  absl::Status CloseShares();
  absl::StatusOr<v1::SecAggShares> InboxFor(const std::string& client) const;
  absl::Status AddMaskedInput(const std::string& client, std::span<const uint64_t> masked);
  absl::Status CloseInputs();
  v1::SecAggSurvivors Survivors() const;
  absl::Status AddConsent(const std::string& client, const v1::SecAggConsent& consent);
  absl::Status CloseConsents();
  absl::StatusOr<v1::SecAggConsents> ConsentsFor(const std::string& client) const;
  absl::Status AddReveal(const std::string& client, const v1::SecAggReveal& reveal);
  // The sum of U3's inputs mod 2^bits (U3 = Survivors()).
  absl::StatusOr<std::vector<uint64_t>> Finish();

  const Instance& instance() const { return instance_; }
  // The steps `client` has taken: 0 none, 1 keys, 2 shares, 3 masked input, 4 consent, 5 reveal
  // (−1: not in the cohort).
  int Stage(const std::string& client) const;
  // The clients that have taken at least `stage` steps, sorted.
  std::vector<std::string> AtLeast(int stage) const;

 private:
  enum class Phase { kKeys, kShares, kInput, kConsent, kUnmask, kDone };
  struct Client {
    int stage = 0;  // the phases it completed: 1 keyed, 2 shared, 3 masked, 4 consented, 5 revealed
    v1::SecAggKeys keys;
    std::vector<v1::SecAggShare> outbox;  // sealed shares it sent
    std::string consent;
    std::vector<Share> self_mask_shares, mask_key_shares;  // revealed by its holders
  };
  ServerSession(Instance instance, PeerVerifier verifier);
  absl::StatusOr<Client*> Expect(const std::string& client, Phase phase, int stage);
  absl::Status Close(Phase next, int stage, std::string_view what);
  bool In(int index, int stage) const { return clients_[index].stage >= stage; }

  Instance instance_;
  PeerVerifier verifier_;
  Phase phase_ = Phase::kKeys;
  std::vector<Client> clients_;  // by cohort index
  std::vector<uint64_t> sum_;    // of U3's masked inputs, mod 2^bits
};

}  // namespace fedlora::secagg

#endif  // FEDLORA_COMMON_SECAGG_PROTOCOL_H_
