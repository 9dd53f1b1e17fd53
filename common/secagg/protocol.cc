#include "common/secagg/protocol.h"

#include <algorithm>
#include <functional>
#include <set>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/secagg/crypto.h"
#include "common/secagg/dp.h"

namespace fedlora::secagg {
namespace {

using common::StrCat;

constexpr char kKeysTag[] = "fedlora secagg keys v1";
constexpr char kSurvivorsTag[] = "fedlora secagg survivors v1";
constexpr char kCommitTag[] = "fedlora secagg self-mask commitment v1";

std::string KeysMessage(const std::string& instance, const std::string& client,
                        const v1::SecAggKeys& keys) {
  return SignedBytes({kKeysTag, instance, client, keys.cipher_public_key(), keys.mask_public_key(),
                      keys.self_mask_commitment()});
}

std::string SurvivorsMessage(const std::string& instance, const std::vector<std::string>& set) {
  std::string out = SignedBytes({kSurvivorsTag, instance, std::to_string(set.size())});
  for (const std::string& c : set) out += SignedBytes({c});
  return out;
}

std::string Commitment(const std::string& instance, const std::string& self_mask) {
  return Sha256(SignedBytes({kCommitTag, instance, self_mask}));
}

absl::StatusOr<std::string> ShareKey(std::string_view private_key, std::string_view peer_public,
                                     const std::string& instance) {
  ASSIGN_OR_RETURN(std::string secret, Agree(private_key, peer_public));
  return Hkdf(secret, instance, "fedlora secagg share key", kKeyBytes);
}

absl::StatusOr<std::string> PairSeed(std::string_view private_key, std::string_view peer_public,
                                     const std::string& instance) {
  ASSIGN_OR_RETURN(std::string secret, Agree(private_key, peer_public));
  return Hkdf(secret, instance, "fedlora secagg pairwise mask", kKeyBytes);
}

// out ± PRG(seed), mod 2^bits.
absl::Status AddMask(std::string_view seed, int bits, bool subtract, std::vector<uint64_t>& out,
                     std::vector<uint64_t>& scratch) {
  scratch.resize(out.size());
  RETURN_IF_ERROR(ExpandSeed(seed, bits, scratch));
  const uint64_t mask = WordMask(bits);
  for (size_t i = 0; i < out.size(); ++i)
    out[i] = (subtract ? out[i] - scratch[i] : out[i] + scratch[i]) & mask;
  return absl::OkStatus();
}

std::vector<std::string> SortedUnique(const google::protobuf::RepeatedPtrField<std::string>& in) {
  std::vector<std::string> out(in.begin(), in.end());
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

uint32_t PointOf(int index) { return static_cast<uint32_t>(index + 1); }

// The secret of `shares` (at least t) that `good` confirms: from the first t, or, when they do not
// give it and there are spare shares, from the first t + 1 less one of the first t (so one wrong
// share among them is passed over). "" when none is confirmed.
absl::StatusOr<std::string> Reconstruct(const std::vector<Share>& shares, int t,
                                        const std::function<bool(const std::string&)>& good) {
  const size_t first = static_cast<size_t>(t);
  std::vector<size_t> left_out = {first};  // leaving out share t: the first t
  if (shares.size() > first)
    for (size_t i = 0; i < first; ++i) left_out.push_back(i);
  for (const size_t skip : left_out) {
    std::vector<Share> subset;
    for (size_t i = 0; i <= first && i < shares.size(); ++i)
      if (i != skip) subset.push_back(shares[i]);
    auto secret = ShamirCombine(subset, t, kKeyBytes);
    if (secret.ok() && good(*secret)) return *std::move(secret);
    if (!secret.ok() && !absl::IsDataLoss(secret.status())) return secret.status();
  }
  return std::string();
}

}  // namespace

// ---- Instance ----

absl::StatusOr<Instance> Instance::Create(v1::SecAggConfig config) {
  const int n = config.cohort_size();
  auto bad = [&](std::string_view what) {
    return absl::InvalidArgumentError(StrCat("secure aggregation config: ", what));
  };
  if (n < 3 || n > 65535) return bad(StrCat("a cohort of ", n, "; expected 3..65535"));
  for (int i = 1; i < n; ++i)
    if (!(config.cohort(i - 1) < config.cohort(i)))
      return bad("the cohort must be sorted, without repeats");
  const int k = config.neighbours();
  if (k < 2 || k > n - 1 || (k != n - 1 && k % 2 != 0))
    return bad(StrCat(k, " neighbours in a cohort of ", n, "; expected an even number < ", n - 1,
                      ", or ", n - 1));
  // A strict majority of each client's k + 1 holders at least: below it a coordinator could show
  // one half of a client's holders that it survived and the other half that it dropped, and
  // collect both of its secrets.
  if (2 * config.threshold() <= k + 1 || config.threshold() > k + 1)
    return bad(StrCat("threshold ", config.threshold(), " of ", k + 1,
                      " holders; expected a strict majority, at most all"));
  if (config.bits() < 1 || config.bits() > 62)
    return bad(StrCat(config.bits(), " bits; expected 1..62"));
  if (config.instance().empty() || config.ring_seed().size() != kKeyBytes ||
      config.rotation_seed().size() != kKeyBytes)
    return bad("expected an instance name and 32-byte ring and rotation seeds");
  if (config.length() < 1) return bad(StrCat("length ", config.length()));
  Instance out;
  out.config_ = std::move(config);
  const GraphParams graph{n, k, out.config_.threshold()};
  ASSIGN_OR_RETURN(std::vector<int> ring, RingOrder(n, out.config_.ring_seed()));
  out.neighbours_.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) out.neighbours_[i] = Neighbours(graph, ring, i);
  return out;
}

size_t Instance::words() const { return RotatedLength(static_cast<size_t>(config_.length())); }

int Instance::IndexOf(std::string_view client) const {
  auto it = std::lower_bound(config_.cohort().begin(), config_.cohort().end(), client);
  return it != config_.cohort().end() && *it == client
             ? static_cast<int>(it - config_.cohort().begin())
             : -1;
}

bool Instance::AreNeighbours(int a, int b) const {
  return std::binary_search(neighbours_[a].begin(), neighbours_[a].end(), b);
}

// ---- ClientSession ----

ClientSession::ClientSession(Instance instance, std::string self, Signer signer,
                             PeerVerifier verifier)
    : instance_(std::move(instance)),
      self_(std::move(self)),
      signer_(std::move(signer)),
      verifier_(std::move(verifier)) {
  index_ = instance_.IndexOf(self_);
}

absl::StatusOr<ClientSession> ClientSession::Create(const v1::SecAggConfig& config,
                                                    std::string self, Signer signer,
                                                    PeerVerifier verifier) {
  ASSIGN_OR_RETURN(Instance instance, Instance::Create(config));
  if (instance.IndexOf(self) < 0)
    return absl::InvalidArgumentError(
        StrCat("secure aggregation config: ", self, " is not in the cohort"));
  return ClientSession(std::move(instance), std::move(self), std::move(signer),
                       std::move(verifier));
}

absl::Status ClientSession::Enter(Phase phase) {
  if (phase_ == Phase::kFailed)
    return absl::FailedPreconditionError("this secure aggregation round already failed here");
  if (phase_ != phase)
    return absl::FailedPreconditionError("secure aggregation steps out of order");
  return absl::OkStatus();
}

absl::Status ClientSession::Fail(absl::Status status) {
  phase_ = Phase::kFailed;
  cipher_key_.clear();
  mask_key_.clear();
  self_mask_.clear();
  return status;
}

absl::StatusOr<v1::SecAggKeys> ClientSession::AdvertiseKeys() {
  RETURN_IF_ERROR(Enter(Phase::kKeys));
  ASSIGN_OR_RETURN(KeyPair cipher, NewKeyPair());
  ASSIGN_OR_RETURN(KeyPair mask, NewKeyPair());
  ASSIGN_OR_RETURN(self_mask_, RandomBytes(kKeyBytes));
  cipher_key_ = std::move(cipher.private_key);
  mask_key_ = std::move(mask.private_key);
  v1::SecAggKeys keys;
  keys.set_cipher_public_key(cipher.public_key);
  keys.set_mask_public_key(mask.public_key);
  keys.set_self_mask_commitment(Commitment(instance_.config().instance(), self_mask_));
  ASSIGN_OR_RETURN(std::string signature,
                   signer_.Sign(KeysMessage(instance_.config().instance(), self_, keys)));
  keys.set_signature(std::move(signature));
  own_keys_ = keys;
  phase_ = Phase::kShares;
  return keys;
}

absl::StatusOr<v1::SecAggShares> ClientSession::ShareKeys(const v1::SecAggRoster& roster) {
  RETURN_IF_ERROR(Enter(Phase::kShares));
  const std::string& instance = instance_.config().instance();
  for (const v1::SecAggKeys& keys : roster.keys()) {
    const int v = instance_.IndexOf(keys.client());
    if (v < 0 || v == index_ || !instance_.AreNeighbours(index_, v) ||
        peers_.contains(keys.client()))
      return Fail(absl::PermissionDeniedError(
          StrCat("the coordinator relayed keys of '", keys.client(),
                 "', which is not a neighbour of ", self_, " (or twice)")));
    if (absl::Status st =
            verifier_.Verify(keys.client(), keys.certificate(),
                             KeysMessage(instance, keys.client(), keys), keys.signature());
        !st.ok())
      return Fail(st);
    peers_[keys.client()].keys = keys;
  }
  const int t = instance_.threshold();
  if (static_cast<int>(peers_.size()) + 1 < t)
    return Fail(absl::FailedPreconditionError(StrCat(self_, " has ", peers_.size(),
                                                     " neighbours with keys; the threshold ", t,
                                                     " needs ", t - 1)));
  std::vector<uint32_t> points{PointOf(index_)};
  for (const auto& [name, peer] : peers_) points.push_back(PointOf(instance_.IndexOf(name)));
  ASSIGN_OR_RETURN(std::vector<Share> b_shares, ShamirSplit(self_mask_, t, points));
  ASSIGN_OR_RETURN(std::vector<Share> s_shares, ShamirSplit(mask_key_, t, points));
  self_mask_share_ = b_shares[0].y;
  v1::SecAggShares out;
  size_t i = 1;
  for (const auto& [name, peer] : peers_) {
    v1::SecAggSharePlain plain;
    plain.set_from(self_);
    plain.set_to(name);
    plain.set_self_mask_share(b_shares[i].y);
    plain.set_mask_key_share(s_shares[i].y);
    ++i;
    ASSIGN_OR_RETURN(std::string key,
                     ShareKey(cipher_key_, peer.keys.cipher_public_key(), instance));
    v1::SecAggShare* share = out.add_shares();
    share->set_from(self_);
    share->set_to(name);
    ASSIGN_OR_RETURN(*share->mutable_sealed(),
                     Seal(key, plain.SerializeAsString(), SignedBytes({instance, self_, name})));
  }
  phase_ = Phase::kInput;
  return out;
}

absl::StatusOr<std::vector<uint64_t>> ClientSession::MaskInput(const v1::SecAggShares& inbox,
                                                               std::span<const uint64_t> input) {
  RETURN_IF_ERROR(Enter(Phase::kInput));
  const std::string& instance = instance_.config().instance();
  const int bits = instance_.config().bits();
  if (input.size() != instance_.words())
    return Fail(absl::InvalidArgumentError(
        StrCat("a quantised update of ", input.size(), " values; expected ", instance_.words())));
  for (const v1::SecAggShare& share : inbox.shares()) {
    auto it = peers_.find(share.from());
    if (it == peers_.end() || share.to() != self_ || it->second.shared)
      return Fail(absl::PermissionDeniedError(StrCat("the coordinator relayed a share from '",
                                                     share.from(), "' to '", share.to(),
                                                     "', which ", self_, " did not expect")));
    auto key = ShareKey(cipher_key_, it->second.keys.cipher_public_key(), instance);
    if (!key.ok()) return Fail(key.status());
    auto opened = Open(*key, share.sealed(), SignedBytes({instance, share.from(), self_}));
    v1::SecAggSharePlain plain;
    // A faulty peer could send this as well as a meddling coordinator: this client declines the
    // round (FAILED_PRECONDITION) rather than stop.
    if (!opened.ok() || !plain.ParseFromString(*opened) || plain.from() != share.from() ||
        plain.to() != self_ || plain.self_mask_share().size() != kShareBytes ||
        plain.mask_key_share().size() != kShareBytes)
      return Fail(absl::FailedPreconditionError(
          StrCat("the share from ", share.from(), " to ", self_, " does not open")));
    it->second.shared = true;
    it->second.self_mask_share = plain.self_mask_share();
    it->second.mask_key_share = plain.mask_key_share();
  }
  // Masked with fewer neighbours than the threshold, the input would be exposed by its self mask
  // alone once its holders reveal it (Bonawitz et al.: |U2| ≥ t).
  size_t shared = 0;
  for (const auto& [name, peer] : peers_) shared += peer.shared;
  if (static_cast<int>(shared) + 1 < instance_.threshold())
    return Fail(absl::FailedPreconditionError(StrCat(self_, " received shares from ", shared,
                                                     " neighbours; masking needs at least ",
                                                     instance_.threshold() - 1)));
  std::vector<uint64_t> out(input.begin(), input.end()), scratch;
  const uint64_t mask = WordMask(bits);
  for (uint64_t& w : out)
    if (w > mask)
      return Fail(
          absl::InvalidArgumentError(StrCat("a quantised value ", w, " of ", bits, " bits")));
  if (absl::Status st = AddMask(self_mask_, bits, false, out, scratch); !st.ok()) return Fail(st);
  for (const auto& [name, peer] : peers_) {
    if (!peer.shared) continue;
    auto seed = PairSeed(mask_key_, peer.keys.mask_public_key(), instance);
    if (!seed.ok()) return Fail(seed.status());
    if (absl::Status st = AddMask(*seed, bits, /*subtract=*/name < self_, out, scratch); !st.ok())
      return Fail(st);
  }
  phase_ = Phase::kConsent;
  return out;
}

absl::StatusOr<v1::SecAggConsent> ClientSession::Consent(const v1::SecAggSurvivors& survivors) {
  RETURN_IF_ERROR(Enter(Phase::kConsent));
  std::vector<std::string> set = SortedUnique(survivors.clients());
  if (set.size() != static_cast<size_t>(survivors.clients_size()) ||
      !std::binary_search(set.begin(), set.end(), self_))
    return Fail(absl::PermissionDeniedError(
        StrCat("the survivor set shown to ", self_, " repeats a client or leaves it out")));
  int holders = 1;
  for (const std::string& c : set) {
    const int v = instance_.IndexOf(c);
    if (v < 0)
      return Fail(absl::PermissionDeniedError(
          StrCat("the survivor set names '", c, "', which is not in the cohort")));
    if (v == index_ || !instance_.AreNeighbours(index_, v)) continue;
    auto it = peers_.find(c);
    if (it == peers_.end() || !it->second.shared)
      return Fail(absl::PermissionDeniedError(
          StrCat("the survivor set names ", c, ", which shared no keys with ", self_)));
    ++holders;
  }
  if (holders < instance_.threshold())
    return Fail(absl::FailedPreconditionError(StrCat(
        holders, " of ", self_, "'s holders survived; the threshold is ", instance_.threshold())));
  v1::SecAggConsent consent;
  consent.set_client(self_);
  ASSIGN_OR_RETURN(*consent.mutable_signature(),
                   signer_.Sign(SurvivorsMessage(instance_.config().instance(), set)));
  survivors_ = std::move(set);
  phase_ = Phase::kUnmask;
  return consent;
}

absl::StatusOr<v1::SecAggReveal> ClientSession::Unmask(const v1::SecAggConsents& consents) {
  RETURN_IF_ERROR(Enter(Phase::kUnmask));
  if (SortedUnique(consents.survivors()) != survivors_ ||
      consents.survivors_size() != static_cast<int>(survivors_.size()))
    return Fail(absl::PermissionDeniedError(
        StrCat("the coordinator showed ", self_,
               " two different survivor sets: it stops, revealing nothing")));
  const std::string message = SurvivorsMessage(instance_.config().instance(), survivors_);
  std::set<std::string> consented;
  for (const v1::SecAggConsent& c : consents.consents()) {
    if (c.client() == self_ || consented.contains(c.client())) continue;
    auto it = peers_.find(c.client());
    if (it == peers_.end())
      return Fail(absl::PermissionDeniedError(StrCat("the coordinator relayed a consent of '",
                                                     c.client(), "', not a neighbour of ", self_)));
    if (absl::Status st =
            verifier_.Verify(c.client(), it->second.keys.certificate(), message, c.signature());
        !st.ok())
      return Fail(absl::PermissionDeniedError(
          StrCat(c.client(), "'s consent is not over the survivor set ", self_,
                 " was shown: the coordinator showed different sets (", st.message(), ")")));
    consented.insert(c.client());
  }
  if (static_cast<int>(consented.size()) + 1 < instance_.threshold())
    return Fail(absl::FailedPreconditionError(StrCat(consented.size() + 1, " of ", self_,
                                                     "'s holders consented to the survivor set; ",
                                                     "the threshold is ", instance_.threshold())));
  v1::SecAggReveal reveal;
  auto* own = reveal.add_entries();
  own->set_of(self_);
  own->set_share(self_mask_share_);
  for (const auto& [name, peer] : peers_) {
    if (!peer.shared) continue;
    const bool survived = std::binary_search(survivors_.begin(), survivors_.end(), name);
    auto* e = reveal.add_entries();
    e->set_of(name);
    e->set_mask_key(!survived);
    e->set_share(survived ? peer.self_mask_share : peer.mask_key_share);
  }
  phase_ = Phase::kDone;
  cipher_key_.clear();  // nothing of the round's secrets is needed any more
  mask_key_.clear();
  self_mask_.clear();
  return reveal;
}

// ---- ServerSession ----

ServerSession::ServerSession(Instance instance, PeerVerifier verifier)
    : instance_(std::move(instance)), verifier_(std::move(verifier)) {
  clients_.resize(static_cast<size_t>(instance_.size()));
  sum_.assign(instance_.words(), 0);
}

absl::StatusOr<ServerSession> ServerSession::Create(const v1::SecAggConfig& config,
                                                    PeerVerifier verifier) {
  ASSIGN_OR_RETURN(Instance instance, Instance::Create(config));
  return ServerSession(std::move(instance), std::move(verifier));
}

absl::StatusOr<ServerSession::Client*> ServerSession::Expect(const std::string& client, Phase phase,
                                                             int stage) {
  static constexpr const char* kNames[] = {"keys",    "shares", "masked input",
                                           "consent", "reveal", "(done)"};
  const int i = instance_.IndexOf(client);
  if (i < 0)
    return absl::PermissionDeniedError(
        StrCat(client, " is not in this secure aggregation round's cohort"));
  if (phase_ != phase || clients_[i].stage != stage)
    return absl::FailedPreconditionError(
        StrCat(client, " sent ", kNames[static_cast<int>(phase)], " while the round ",
               phase_ == phase
                   ? StrCat("does not expect them of it (it is at step ", clients_[i].stage, ")")
                   : StrCat("collects ", kNames[static_cast<int>(phase_)])));
  return &clients_[i];
}

absl::Status ServerSession::Close(Phase next, int stage, std::string_view what) {
  if (static_cast<int>(next) != static_cast<int>(phase_) + 1)
    return absl::FailedPreconditionError("secure aggregation phases closed out of order");
  int count = 0;
  for (int i = 0; i < instance_.size(); ++i) count += In(i, stage);
  phase_ = next;
  if (count < instance_.threshold())
    return absl::FailedPreconditionError(StrCat(count, " clients ", what, "; secure aggregation ",
                                                "needs at least the threshold, ",
                                                instance_.threshold()));
  return absl::OkStatus();
}

int ServerSession::Stage(const std::string& client) const {
  const int i = instance_.IndexOf(client);
  return i < 0 ? -1 : clients_[i].stage;
}

std::vector<std::string> ServerSession::AtLeast(int stage) const {
  std::vector<std::string> out;
  for (int i = 0; i < instance_.size(); ++i)
    if (In(i, stage)) out.push_back(instance_.Name(i));
  return out;
}

absl::Status ServerSession::AddKeys(const std::string& client, v1::SecAggKeys keys) {
  ASSIGN_OR_RETURN(Client * c, Expect(client, Phase::kKeys, 0));
  if (keys.cipher_public_key().size() != kKeyBytes || keys.mask_public_key().size() != kKeyBytes ||
      keys.self_mask_commitment().size() != 32)
    return absl::InvalidArgumentError(
        StrCat(client, "'s keys: expected two 32-byte public keys and a 32-byte commitment"));
  keys.set_client(client);
  RETURN_IF_ERROR(verifier_.Verify(client, keys.certificate(),
                                   KeysMessage(instance_.config().instance(), client, keys),
                                   keys.signature()));
  c->keys = std::move(keys);
  c->stage = 1;
  return absl::OkStatus();
}

absl::Status ServerSession::CloseKeys() { return Close(Phase::kShares, 1, "advertised keys"); }

absl::StatusOr<v1::SecAggRoster> ServerSession::RosterFor(const std::string& client) const {
  const int i = instance_.IndexOf(client);
  if (i < 0 || phase_ < Phase::kShares || !In(i, 1))
    return absl::FailedPreconditionError(StrCat("no roster for ", client));
  v1::SecAggRoster roster;
  for (int v : instance_.NeighboursOf(i))
    if (In(v, 1)) *roster.add_keys() = clients_[v].keys;
  return roster;
}

absl::Status ServerSession::AddShares(const std::string& client, const v1::SecAggShares& shares) {
  ASSIGN_OR_RETURN(Client * c, Expect(client, Phase::kShares, 1));
  const int i = instance_.IndexOf(client);
  std::set<int> to;
  for (const v1::SecAggShare& s : shares.shares()) {
    const int v = instance_.IndexOf(s.to());
    if (s.from() != client || v < 0 || !instance_.AreNeighbours(i, v) || !In(v, 1) ||
        !to.insert(v).second)
      return absl::InvalidArgumentError(
          StrCat(client, " sent a share to '", s.to(), "', not a neighbour with keys (or twice)"));
  }
  for (int v : instance_.NeighboursOf(i))
    if (In(v, 1) && !to.contains(v))
      return absl::InvalidArgumentError(
          StrCat(client, " sent no share to its neighbour ", instance_.Name(v)));
  c->outbox.assign(shares.shares().begin(), shares.shares().end());
  c->stage = 2;
  return absl::OkStatus();
}

absl::Status ServerSession::CloseShares() { return Close(Phase::kInput, 2, "shared keys"); }

absl::StatusOr<v1::SecAggShares> ServerSession::InboxFor(const std::string& client) const {
  const int i = instance_.IndexOf(client);
  if (i < 0 || phase_ < Phase::kInput || !In(i, 2))
    return absl::FailedPreconditionError(StrCat("no shares for ", client));
  v1::SecAggShares inbox;
  for (int v : instance_.NeighboursOf(i)) {
    if (!In(v, 2)) continue;
    for (const v1::SecAggShare& s : clients_[v].outbox)
      if (s.to() == client) *inbox.add_shares() = s;
  }
  return inbox;
}

absl::Status ServerSession::AddMaskedInput(const std::string& client,
                                           std::span<const uint64_t> masked) {
  ASSIGN_OR_RETURN(Client * c, Expect(client, Phase::kInput, 2));
  const uint64_t mask = WordMask(instance_.config().bits());
  if (masked.size() != sum_.size())
    return absl::InvalidArgumentError(
        StrCat(client, "'s masked input has ", masked.size(), " values; expected ", sum_.size()));
  for (uint64_t w : masked)
    if (w > mask)
      return absl::InvalidArgumentError(
          StrCat(client, "'s masked input holds ", w, ", not below 2^", instance_.config().bits()));
  for (size_t j = 0; j < sum_.size(); ++j) sum_[j] = (sum_[j] + masked[j]) & mask;
  c->stage = 3;
  return absl::OkStatus();
}

absl::Status ServerSession::CloseInputs() { return Close(Phase::kConsent, 3, "sent masked input"); }

v1::SecAggSurvivors ServerSession::Survivors() const {
  v1::SecAggSurvivors out;
  for (int i = 0; i < instance_.size(); ++i)
    if (In(i, 3)) out.add_clients(instance_.Name(i));
  return out;
}

absl::Status ServerSession::AddConsent(const std::string& client,
                                       const v1::SecAggConsent& consent) {
  ASSIGN_OR_RETURN(Client * c, Expect(client, Phase::kConsent, 3));
  const v1::SecAggSurvivors survivors = Survivors();
  RETURN_IF_ERROR(
      verifier_.Verify(client, c->keys.certificate(),
                       SurvivorsMessage(instance_.config().instance(),
                                        {survivors.clients().begin(), survivors.clients().end()}),
                       consent.signature()));
  c->consent = consent.signature();
  c->stage = 4;
  return absl::OkStatus();
}

absl::Status ServerSession::CloseConsents() {
  return Close(Phase::kUnmask, 4, "consented to the survivor set");
}

absl::StatusOr<v1::SecAggConsents> ServerSession::ConsentsFor(const std::string& client) const {
  const int i = instance_.IndexOf(client);
  if (i < 0 || phase_ < Phase::kUnmask || !In(i, 4))
    return absl::FailedPreconditionError(StrCat("no consents for ", client));
  v1::SecAggConsents out;
  *out.mutable_survivors() = Survivors().clients();
  for (int v : instance_.NeighboursOf(i)) {
    if (!In(v, 4)) continue;
    v1::SecAggConsent* c = out.add_consents();
    c->set_client(instance_.Name(v));
    c->set_signature(clients_[v].consent);
  }
  return out;
}

absl::Status ServerSession::AddReveal(const std::string& client, const v1::SecAggReveal& reveal) {
  ASSIGN_OR_RETURN(Client * c, Expect(client, Phase::kUnmask, 4));
  const int i = instance_.IndexOf(client);
  std::set<int> seen;
  std::vector<std::pair<int, Share>> self_mask, mask_key;
  for (const v1::SecAggReveal::Entry& e : reveal.entries()) {
    const int v = instance_.IndexOf(e.of());
    const bool holder = v == i || (v >= 0 && instance_.AreNeighbours(i, v) && In(v, 2));
    if (!holder || !seen.insert(v).second || e.mask_key() != !In(v, 3) ||
        e.share().size() != kShareBytes)
      return absl::InvalidArgumentError(
          StrCat(client, " revealed a share of '", e.of(), "' it may not reveal"));
    (e.mask_key() ? mask_key : self_mask).push_back({v, Share{PointOf(i), e.share()}});
  }
  for (auto& [v, share] : self_mask) clients_[v].self_mask_shares.push_back(std::move(share));
  for (auto& [v, share] : mask_key) clients_[v].mask_key_shares.push_back(std::move(share));
  c->stage = 5;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint64_t>> ServerSession::Finish() {
  if (phase_ != Phase::kUnmask)
    return absl::FailedPreconditionError("the secure aggregation round is not unmasking");
  const std::string& instance = instance_.config().instance();
  const int bits = instance_.config().bits(), t = instance_.threshold();
  std::vector<uint64_t> sum = sum_, scratch;
  for (int u = 0; u < instance_.size(); ++u) {
    Client& c = clients_[u];
    const std::string& name = instance_.Name(u);
    if (In(u, 3)) {  // a survivor: remove its self mask
      if (static_cast<int>(c.self_mask_shares.size()) < t)
        return absl::FailedPreconditionError(StrCat(c.self_mask_shares.size(), " holders revealed ",
                                                    name, "'s self-mask seed; it needs ", t));
      ASSIGN_OR_RETURN(std::string seed,
                       Reconstruct(c.self_mask_shares, t, [&](const std::string& s) {
                         return Commitment(instance, s) == c.keys.self_mask_commitment();
                       }));
      if (seed.empty())
        return absl::DataLossError(StrCat("the shares of ", name,
                                          "'s self-mask seed do not give the seed it committed "
                                          "to: holders revealed wrong shares"));
      RETURN_IF_ERROR(AddMask(seed, bits, /*subtract=*/true, sum, scratch));
    } else if (In(u, 2)) {  // shared, then dropped: remove its survivors' masks with it
      if (static_cast<int>(c.mask_key_shares.size()) < t)
        return absl::FailedPreconditionError(StrCat(c.mask_key_shares.size(),
                                                    " holders revealed dropped client ", name,
                                                    "'s mask key; it needs ", t));
      ASSIGN_OR_RETURN(std::string key,
                       Reconstruct(c.mask_key_shares, t, [&](const std::string& s) {
                         auto public_key = PublicKeyOf(s);
                         return public_key.ok() && *public_key == c.keys.mask_public_key();
                       }));
      if (key.empty())
        return absl::DataLossError(StrCat("the shares of ", name,
                                          "'s mask key do not give its advertised key: holders "
                                          "revealed wrong shares"));
      for (int v : instance_.NeighboursOf(u)) {
        if (!In(v, 3)) continue;
        ASSIGN_OR_RETURN(std::string seed,
                         PairSeed(key, clients_[v].keys.mask_public_key(), instance));
        // v added +PRG when v < u, −PRG otherwise; take that back.
        RETURN_IF_ERROR(AddMask(seed, bits, /*subtract=*/instance_.Name(v) < name, sum, scratch));
      }
    }
  }
  phase_ = Phase::kDone;
  for (Client& c : clients_) {  // nothing of the secrets outlives the sum
    c.self_mask_shares.clear();
    c.mask_key_shares.clear();
  }
  return sum;
}

}  // namespace fedlora::secagg
