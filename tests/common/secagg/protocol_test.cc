#include "common/secagg/protocol.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <openssl/rand.h>

#include <optional>
#include <set>

#include "common/base/file_util.h"
#include "common/net/certs.h"
#include "tests/scratch_dir.h"

namespace fedlora::secagg {
namespace {

using ::testing::HasSubstr;

constexpr int kClients = 7;

// Certificates of client-1 … client-7 under one CA, made once.
class Pki {
 public:
  static const Pki& Get() {
    static const Pki* pki = new Pki();
    return *pki;
  }
  Signer SignerOf(int k) const { return *Signer::FromPemFile((dir_ / Name(k, ".key")).string()); }
  std::string CertificateOf(int k) const { return pem_[k - 1]; }
  std::string ServerCertificate() const { return *common::ReadFileToString(dir_ / "server.pem"); }
  std::string ServerKey() const { return *common::ReadFileToString(dir_ / "server.key"); }
  static std::string ServerName() { return "coordinator"; }
  PeerVerifier Verifier() const {
    return *PeerVerifier::FromCaPem(*common::ReadFileToString(dir_ / "ca.pem"));
  }
  static std::string Name(int k, const char* ext = "") {
    return "client-" + std::to_string(k) + ext;
  }

 private:
  Pki() {
    EXPECT_TRUE(common::MakeRunCertificates(dir_.path(), kClients).ok());
    for (int k = 1; k <= kClients; ++k) {
      pem_.push_back(*common::ReadFileToString(dir_ / Name(k, ".pem")));
    }
  }
  testing::ScratchDir dir_;
  std::vector<std::string> pem_;
};

std::string Seed(char c) { return std::string(32, c); }

// A config for clients 1..n (names sort as client-1 < … < client-7).
v1::SecAggConfig Config(int n, int neighbours, int threshold, int bits = 20, int length = 100) {
  v1::SecAggConfig c;
  c.set_instance("run-a/round-1/attempt-0");
  for (int k = 1; k <= n; ++k) c.add_cohort(Pki::Name(k));
  c.set_neighbours(neighbours);
  c.set_threshold(threshold);
  c.set_ring_seed(Seed('r'));
  c.set_rotation_seed(Seed('o'));
  c.set_length(length);
  c.set_bits(bits);
  return c;
}

std::vector<uint64_t> RandomInput(size_t n, int bits) {
  std::vector<uint64_t> v(n);
  RAND_bytes(reinterpret_cast<unsigned char*>(v.data()), static_cast<int>(n * 8));
  for (uint64_t& w : v) w &= (uint64_t{1} << bits) - 1;
  return v;
}

// A federation run through the protocol by an honest coordinator; client k stops before step
// drop[k] (1 keys, 2 shares, 3 masked input, 4 consent, 5 reveal; 0: never).
struct Outcome {
  absl::StatusOr<std::vector<uint64_t>> sum = absl::UnknownError("not run");
  std::vector<uint64_t> expected;  // Σ of the inputs of the clients that sent masked input
  absl::Status closed;             // the first Close that failed
};

Outcome RunFederation(const v1::SecAggConfig& config, std::map<int, int> drop) {
  const Pki& pki = Pki::Get();
  const int n = config.cohort_size();
  auto server = ServerSession::Create(config, pki.Verifier());
  EXPECT_TRUE(server.ok()) << server.status();
  std::vector<std::optional<ClientSession>> clients;
  for (int k = 1; k <= n; ++k)
    clients.emplace_back(
        *ClientSession::Create(config, Pki::Name(k), pki.SignerOf(k), pki.Verifier()));
  auto alive = [&](int k, int step) { return drop[k] == 0 || drop[k] > step; };
  Outcome run;
  run.expected.assign(server->instance().words(), 0);
  auto close = [&](absl::Status st) {
    if (run.closed.ok()) run.closed = st;
    return st.ok();
  };
  for (int k = 1; k <= n; ++k) {
    if (!alive(k, 1)) continue;
    v1::SecAggKeys keys = *clients[k - 1]->AdvertiseKeys();
    keys.set_certificate(pki.CertificateOf(k));
    EXPECT_TRUE(server->AddKeys(Pki::Name(k), keys).ok());
  }
  if (!close(server->CloseKeys())) return run;
  for (int k = 1; k <= n; ++k) {
    if (!alive(k, 2)) continue;
    auto shares = clients[k - 1]->ShareKeys(*server->RosterFor(Pki::Name(k)));
    EXPECT_TRUE(shares.ok()) << shares.status();
    EXPECT_TRUE(server->AddShares(Pki::Name(k), *shares).ok());
  }
  if (!close(server->CloseShares())) return run;
  const uint64_t mask = (uint64_t{1} << config.bits()) - 1;
  for (int k = 1; k <= n; ++k) {
    if (!alive(k, 3)) continue;
    const std::vector<uint64_t> input = RandomInput(server->instance().words(), config.bits());
    auto masked = clients[k - 1]->MaskInput(*server->InboxFor(Pki::Name(k)), input);
    EXPECT_TRUE(masked.ok()) << masked.status();
    EXPECT_NE(*masked, input);
    EXPECT_TRUE(server->AddMaskedInput(Pki::Name(k), *masked).ok());
    for (size_t j = 0; j < input.size(); ++j) run.expected[j] = (run.expected[j] + input[j]) & mask;
  }
  if (!close(server->CloseInputs())) return run;
  for (int k = 1; k <= n; ++k) {
    if (!alive(k, 4) || !alive(k, 3)) continue;
    auto consent = clients[k - 1]->Consent(server->Survivors());
    EXPECT_TRUE(consent.ok()) << consent.status();
    EXPECT_TRUE(server->AddConsent(Pki::Name(k), *consent).ok());
  }
  if (!close(server->CloseConsents())) return run;
  for (int k = 1; k <= n; ++k) {
    if (!alive(k, 5) || !alive(k, 3)) continue;
    auto reveal = clients[k - 1]->Unmask(*server->ConsentsFor(Pki::Name(k)));
    EXPECT_TRUE(reveal.ok()) << reveal.status();
    EXPECT_TRUE(server->AddReveal(Pki::Name(k), *reveal).ok());
  }
  run.sum = server->Finish();
  return run;
}

// The masks cancel: the unmasked sum is the inputs' sum mod 2^bits, on the complete graph and on
// a ring, at small and wide words.
TEST(SecAggProtocolTest, MasksCancelModTwoToTheBits) {
  for (const auto& [config, what] :
       {std::pair{Config(5, 4, 3), "complete graph"}, std::pair{Config(7, 4, 4, 62), "ring"},
        std::pair{Config(3, 2, 2, 1, 5), "one bit"}}) {
    Outcome run = RunFederation(config, {});
    ASSERT_TRUE(run.sum.ok()) << what << ": " << run.sum.status();
    EXPECT_EQ(*run.sum, run.expected) << what;
  }
}

// A client lost at any step: before its keys or shares it is simply not in the sum; after its
// shares its masks are removed from its mask key's shares; after its masked input its self mask
// is removed from its seed's shares and its input counts.
TEST(SecAggProtocolTest, ADroppedClientAtEveryStep) {
  for (int step = 1; step <= 5; ++step) {
    for (const v1::SecAggConfig& config : {Config(5, 4, 3), Config(7, 4, 4)}) {
      Outcome run = RunFederation(config, {{2, step}});
      ASSERT_TRUE(run.sum.ok()) << "drop at step " << step << ": " << run.sum.status();
      EXPECT_EQ(*run.sum, run.expected) << "drop at step " << step;
    }
  }
  // Two lost on the complete graph of 5 (t = 3): one after sharing, one after its input.
  Outcome run = RunFederation(Config(5, 4, 3), {{1, 3}, {4, 4}});
  ASSERT_TRUE(run.sum.ok()) << run.sum.status();
  EXPECT_EQ(*run.sum, run.expected);
}

// Below the threshold the round stops without a sum: too few keys, or too few holders left to
// reveal a survivor's seed.
TEST(SecAggProtocolTest, BelowTheThresholdThereIsNoSum) {
  Outcome run = RunFederation(Config(5, 4, 3), {{1, 1}, {2, 1}, {3, 1}});
  EXPECT_EQ(run.closed.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(run.closed.message(), HasSubstr("2 clients advertised keys"));
  // Three of five send input and then two of those vanish before revealing: one holder is left.
  run = RunFederation(Config(5, 4, 3), {{1, 3}, {2, 3}, {3, 5}, {4, 5}});
  EXPECT_FALSE(run.sum.ok());
  EXPECT_EQ(run.sum.status().code(), absl::StatusCode::kFailedPrecondition) << run.sum.status();
}

// What a coordinator relays is checked: keys under another client's certificate, a share altered
// on the way, steps out of order.
TEST(SecAggProtocolTest, RelayedKeysAndSharesAreChecked) {
  const Pki& pki = Pki::Get();
  const v1::SecAggConfig config = Config(3, 2, 2);
  std::vector<ClientSession> c;
  for (int k = 1; k <= 3; ++k)
    c.push_back(*ClientSession::Create(config, Pki::Name(k), pki.SignerOf(k), pki.Verifier()));
  EXPECT_EQ(c[0].Consent({}).status().code(), absl::StatusCode::kFailedPrecondition);
  std::vector<v1::SecAggKeys> keys;
  for (int k = 1; k <= 3; ++k) {
    keys.push_back(*c[k - 1].AdvertiseKeys());
    keys.back().set_client(Pki::Name(k));
    keys.back().set_certificate(pki.CertificateOf(k));
  }
  auto server = ServerSession::Create(config, pki.Verifier());
  v1::SecAggKeys forged = keys[1];  // client-2's keys under client-3's certificate
  forged.set_certificate(pki.CertificateOf(3));
  EXPECT_EQ(server->AddKeys("client-2", forged).code(), absl::StatusCode::kPermissionDenied);
  v1::SecAggKeys swapped = keys[1];  // client-2's certificate, a key the coordinator chose
  swapped.set_mask_public_key(keys[2].mask_public_key());
  EXPECT_EQ(server->AddKeys("client-2", swapped).code(), absl::StatusCode::kPermissionDenied);
  v1::SecAggRoster roster;
  *roster.add_keys() = swapped;
  *roster.add_keys() = keys[2];
  absl::Status st = c[0].ShareKeys(roster).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(st.message(), HasSubstr("client-2"));
  EXPECT_THAT(c[0].ShareKeys(roster).status().message(), HasSubstr("already failed"));

  // An altered share does not open.
  v1::SecAggRoster r2;
  *r2.add_keys() = keys[0];
  *r2.add_keys() = keys[2];
  auto shares = c[1].ShareKeys(r2);
  ASSERT_TRUE(shares.ok()) << shares.status();
  v1::SecAggShares inbox;
  for (const auto& s : shares->shares())
    if (s.to() == "client-3") *inbox.add_shares() = s;
  ASSERT_EQ(inbox.shares_size(), 1);
  v1::SecAggRoster r3;
  *r3.add_keys() = keys[0];
  *r3.add_keys() = keys[1];
  ASSERT_TRUE(c[2].ShareKeys(r3).ok());
  v1::SecAggShares altered = inbox;
  altered.mutable_shares(0)->mutable_sealed()->back() ^= 1;
  // A faulty peer could have sent it as well: the client declines the round, it does not stop.
  st = c[2].MaskInput(altered, std::vector<uint64_t>(128, 0)).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("does not open"));
}

// A coordinator that withholds a client's inbox would have it masked by its self mask alone,
// which the holders' reveals remove: the client refuses to mask with fewer neighbours than t − 1.
TEST(SecAggProtocolTest, AShortInboxIsRefused) {
  const Pki& pki = Pki::Get();
  const v1::SecAggConfig config = Config(3, 2, 2);
  std::vector<ClientSession> c;
  std::vector<v1::SecAggKeys> keys;
  for (int k = 1; k <= 3; ++k) {
    c.push_back(*ClientSession::Create(config, Pki::Name(k), pki.SignerOf(k), pki.Verifier()));
    keys.push_back(*c.back().AdvertiseKeys());
    keys.back().set_client(Pki::Name(k));
    keys.back().set_certificate(pki.CertificateOf(k));
  }
  v1::SecAggRoster roster;
  *roster.add_keys() = keys[1];
  *roster.add_keys() = keys[2];
  ASSERT_TRUE(c[0].ShareKeys(roster).ok());
  const absl::Status st = c[0].MaskInput({}, std::vector<uint64_t>(128, 0)).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(st.message(), HasSubstr("masking needs at least 1"));
}

// Clients refuse a threshold below a strict majority of the holders (a coordinator could then
// show two halves two survivor sets), and the coordinator's own certificate as a peer's.
TEST(SecAggProtocolTest, AWeakConfigAndAServerCertificateAreRefused) {
  const Pki& pki = Pki::Get();
  auto weak = ClientSession::Create(Config(5, 4, 3), "client-1", pki.SignerOf(1), pki.Verifier());
  EXPECT_TRUE(weak.ok());
  weak = ClientSession::Create(Config(7, 4, 2), "client-1", pki.SignerOf(1), pki.Verifier());
  EXPECT_EQ(weak.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(weak.status().message(), HasSubstr("strict majority"));
  // The coordinator's certificate ("coordinator", serverAuth) from the same CA, with its key.
  const Signer server_signer = *Signer::FromPem(pki.ServerKey());
  const std::string message = "anything";
  const std::string signature = *server_signer.Sign(message);
  const absl::Status st =
      pki.Verifier().Verify(pki.ServerName(), pki.ServerCertificate(), message, signature);
  EXPECT_EQ(st.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(st.message(), HasSubstr("does not verify against the CA"));
}

// Clients 1..n of `config` and a coordinator, honest, through keys, shares (and, with
// `inputs`, masked inputs and consents, up to the unmasking step); `expected` is the inputs' sum.
struct Honest {
  std::optional<ServerSession> server;
  std::vector<ClientSession> clients;
  std::vector<uint64_t> expected;
};
Honest RunHonestly(const v1::SecAggConfig& config, bool inputs) {
  const Pki& pki = Pki::Get();
  const int n = config.cohort_size();
  Honest h;
  h.server.emplace(*ServerSession::Create(config, pki.Verifier()));
  ServerSession& server = *h.server;
  for (int k = 1; k <= n; ++k) {
    h.clients.push_back(
        *ClientSession::Create(config, Pki::Name(k), pki.SignerOf(k), pki.Verifier()));
    v1::SecAggKeys keys = *h.clients.back().AdvertiseKeys();
    keys.set_certificate(pki.CertificateOf(k));
    EXPECT_TRUE(server.AddKeys(Pki::Name(k), keys).ok());
  }
  EXPECT_TRUE(server.CloseKeys().ok());
  for (int k = 1; k <= n; ++k)
    EXPECT_TRUE(
        server.AddShares(Pki::Name(k), *h.clients[k - 1].ShareKeys(*server.RosterFor(Pki::Name(k))))
            .ok());
  EXPECT_TRUE(server.CloseShares().ok());
  if (!inputs) return h;
  h.expected.assign(128, 0);
  for (int k = 1; k <= n; ++k) {
    const std::vector<uint64_t> input = RandomInput(128, 20);
    for (size_t j = 0; j < 128; ++j) h.expected[j] = (h.expected[j] + input[j]) & ((1u << 20) - 1);
    EXPECT_TRUE(server
                    .AddMaskedInput(Pki::Name(k), *h.clients[k - 1].MaskInput(
                                                      *server.InboxFor(Pki::Name(k)), input))
                    .ok());
  }
  EXPECT_TRUE(server.CloseInputs().ok());
  for (int k = 1; k <= n; ++k)
    EXPECT_TRUE(
        server.AddConsent(Pki::Name(k), *h.clients[k - 1].Consent(server.Survivors())).ok());
  EXPECT_TRUE(server.CloseConsents().ok());
  return h;
}

// One wrong share among spare ones is passed over: with three holders revealing and t = 2, the
// seed is still the committed one.
TEST(SecAggProtocolTest, AWrongShareAmongSpareOnesIsPassedOver) {
  Honest h = RunHonestly(Config(3, 2, 2), /*inputs=*/true);
  ServerSession& server = *h.server;
  v1::SecAggReveal bad = *h.clients[0].Unmask(*server.ConsentsFor("client-1"));
  bad.mutable_entries(0)->mutable_share()->back() ^= 1;  // client-1's share of its own seed
  ASSERT_TRUE(server.AddReveal("client-1", bad).ok());
  for (int k = 2; k <= 3; ++k)
    ASSERT_TRUE(
        server.AddReveal(Pki::Name(k), *h.clients[k - 1].Unmask(*server.ConsentsFor(Pki::Name(k))))
            .ok());
  auto sum = server.Finish();
  ASSERT_TRUE(sum.ok()) << sum.status();
  EXPECT_EQ(*sum, h.expected);
}

// The consistency round: a coordinator that shows client-4 as a survivor to some clients and as
// dropped to others (to collect both its seed's and its mask key's shares) is caught by every
// client it tries, which then reveals nothing.
TEST(SecAggProtocolTest, TwoSurvivorSetsAreDetected) {
  Honest h = RunHonestly(Config(4, 3, 3), /*inputs=*/false);
  std::vector<ClientSession>& c = h.clients;
  for (int k = 1; k <= 4; ++k)
    ASSERT_TRUE(c[k - 1].MaskInput(*h.server->InboxFor(Pki::Name(k)), RandomInput(128, 20)).ok());
  v1::SecAggSurvivors all, without_4;
  for (int k = 1; k <= 4; ++k) all.add_clients(Pki::Name(k));
  for (int k = 1; k <= 3; ++k) without_4.add_clients(Pki::Name(k));
  // client-1 and client-4 see everyone; client-2 and client-3 are told client-4 dropped.
  std::vector<v1::SecAggConsent> consents = {*c[0].Consent(all), *c[1].Consent(without_4),
                                             *c[2].Consent(without_4), *c[3].Consent(all)};
  // Relaying every consent to client-1: client-2's and client-3's are over another set.
  v1::SecAggConsents to_1;
  *to_1.mutable_survivors() = all.clients();
  for (int k : {2, 3, 4}) *to_1.add_consents() = consents[k - 1];
  absl::Status st = c[0].Unmask(to_1).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kPermissionDenied);
  EXPECT_THAT(st.message(), HasSubstr("different sets"));
  // Relaying only the matching ones to client-4 leaves it short of t = 3 consents.
  v1::SecAggConsents to_4;
  *to_4.mutable_survivors() = all.clients();
  *to_4.add_consents() = consents[0];
  st = c[3].Unmask(to_4).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kFailedPrecondition);
  // Showing client-2 the set it did not sign: refused outright.
  v1::SecAggConsents to_2;
  *to_2.mutable_survivors() = all.clients();
  st = c[1].Unmask(to_2).status();
  EXPECT_THAT(st.message(), HasSubstr("two different survivor sets"));
  // client-3, shown a consistent story (its own set, client-2's consent, client-1's forged by
  // relaying the one over the other set), refuses too.
  v1::SecAggConsents to_3;
  *to_3.mutable_survivors() = without_4.clients();
  *to_3.add_consents() = consents[1];
  *to_3.add_consents() = consents[0];
  EXPECT_EQ(c[2].Unmask(to_3).status().code(), absl::StatusCode::kPermissionDenied);
}

// A holder that reveals a wrong share cannot make the coordinator commit a wrong sum: the seed
// it reconstructs fails its commitment.
TEST(SecAggProtocolTest, AWrongRevealedShareGivesNoSum) {
  Honest h = RunHonestly(Config(3, 2, 3), /*inputs=*/true);
  ServerSession* server = &*h.server;
  std::vector<ClientSession>& c = h.clients;
  // A reveal of a share the client may not give (client-1's mask key: it survived) is refused.
  v1::SecAggReveal bad = *c[0].Unmask(*server->ConsentsFor("client-1"));
  bad.mutable_entries(1)->set_mask_key(true);
  EXPECT_EQ(server->AddReveal("client-1", bad).code(), absl::StatusCode::kInvalidArgument);
  bad.mutable_entries(1)->set_mask_key(false);
  bad.mutable_entries(1)->mutable_share()->back() ^= 1;  // a wrong share of a survivor's seed
  ASSERT_TRUE(server->AddReveal("client-1", bad).ok());
  for (int k = 2; k <= 3; ++k)
    ASSERT_TRUE(
        server->AddReveal(Pki::Name(k), *c[k - 1].Unmask(*server->ConsentsFor(Pki::Name(k)))).ok());
  auto sum = server->Finish();
  EXPECT_EQ(sum.status().code(), absl::StatusCode::kDataLoss) << sum.status();
}

}  // namespace
}  // namespace fedlora::secagg
