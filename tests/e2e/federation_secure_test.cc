// Secure aggregation end to end (README "Secure aggregation"): real fedlora-server and
// fedlora-client processes over mutual TLS, the coordinator seeing only masked inputs and their
// sum.
#include <mutex>
#include <set>

#include "common/aggregation/lora_fair.h"
#include "common/privacy/client_dp.h"
#include "common/secagg/protocol.h"
#include "common/tensor/linalg.h"
#include "common/tensor/peft.h"
#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

// A coordinator that lies, for three real fedlora-client processes over mutual TLS: it runs a
// fedit round's protocol honestly (common/secagg/protocol.h's ServerSession) up to the survivor
// set, then tells client-2 that client-3 dropped — to collect client-3's mask key from client-2
// and its self-mask seed from the others, and so unmask client-3's input alone — while telling
// client-1 and client-3 that everyone survived; and it relays every consent it got.
class LyingCoordinator final : public v1::Coordinator::CallbackService {
 public:
  int reveals() {
    std::lock_guard lock(mu_);
    return reveals_;
  }

 private:
  static std::string Peer(grpc::CallbackServerContext* c, const char* property) {
    const auto v = c->auth_context()->FindPropertyValues(property);
    return v.empty() ? "" : std::string(v[0].data(), v[0].size());
  }
  template <typename T>
  static grpc::ServerUnaryReactor* Done(grpc::CallbackServerContext* c,
                                        grpc::Status s = grpc::Status::OK) {
    grpc::ServerUnaryReactor* r = c->DefaultReactor();
    r->Finish(s);
    return r;
  }
  grpc::ServerUnaryReactor* Join(grpc::CallbackServerContext* c, const v1::JoinRequest* request,
                                 v1::JoinResponse* response) override {
    std::lock_guard lock(mu_);
    if (modules_.empty()) modules_.assign(request->modules().begin(), request->modules().end());
    joined_.insert(Peer(c, "x509_common_name"));
    response->set_run_id("lying");
    response->set_method(v1::METHOD_FEDIT);
    response->set_rounds(1);
    response->set_max_chunk_bytes(1 << 20);
    return Done<v1::JoinResponse>(c);
  }
  // The round: version 0 (A random, B zero), its config once all three have joined.
  void OpenLocked() {
    std::vector<common::ModuleShape> shapes;
    for (const v1::ModuleSpec& m : modules_)
      shapes.push_back({m.name(), 4, m.in_features(), m.out_features(), 1.0, false});
    common::Adapter start = *common::Adapter::Create(shapes);
    std::mt19937_64 rng(5);
    for (size_t i = 0; i < start.num_modules(); ++i) common::InitLoraA(start.A(i), rng);
    blob_ = common::EncodeAdapter(start, common::AdapterParts::kAll);
    for (const std::string& id : joined_) config_.add_cohort(id);
    config_.set_instance("lying/round-1");
    config_.set_neighbours(2);
    config_.set_threshold(2);
    config_.set_ring_seed(std::string(32, 'r'));
    config_.set_rotation_seed(std::string(32, 'o'));
    config_.set_length(static_cast<int64_t>(common::TrainableCount(start)));
    config_.set_clip(10);
    config_.set_change_clip(10);
    config_.set_scale(65536);
    config_.set_clamp(int64_t{1} << 24);
    config_.set_bits(30);
    session_.emplace(*secagg::ServerSession::Create(
        config_, *secagg::PeerVerifier::FromCaPem(*common::ReadFileToString(ca_))));
  }
  grpc::ServerUnaryReactor* GetTask(grpc::CallbackServerContext* c, const v1::GetTaskRequest*,
                                    v1::Task* task) override {
    std::unique_lock lock(mu_);
    const std::string id = Peer(c, "x509_common_name");
    task->set_kind(v1::Task::WAIT);
    task->set_round(1);
    if (joined_.size() < 3) {
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      return Done<v1::Task>(c);
    }
    if (!session_) OpenLocked();
    const int stage = session_->Stage(id);
    const auto all = [&](int s) { return session_->AtLeast(s).size() == 3; };
    v1::SecAggStep* step = task->mutable_secagg();
    step->set_instance(config_.instance());
    if (stage == 0) {
      task->clear_secagg();
      task->set_kind(v1::Task::TRAIN);
      task->set_method(v1::METHOD_FEDIT);
      task->set_state_version(0);
      v1::BlobRef* ref = task->add_downloads();
      ref->set_sha256(common::Sha256Hex(blob_));
      ref->set_size(static_cast<int64_t>(blob_.size()));
      ref->set_kind(v1::BLOB_KIND_ADAPTER);
      v1::TrainSettings* s = task->mutable_settings();
      s->set_rank(4);
      s->set_lora_alpha(8);
      s->set_local_steps(5);
      s->set_learning_rate(0.1);
      s->set_seed(7);
      for (const v1::ModuleSpec& m : modules_) *task->add_modules() = m;
      task->set_heartbeat_interval_ms(1000);
      *task->mutable_secagg_config() = config_;
    } else if (stage == 1 && all(1)) {
      if (!closed_keys_) closed_keys_ = session_->CloseKeys().ok();
      *step->mutable_roster() = *session_->RosterFor(id);
      task->set_kind(v1::Task::SECAGG);
    } else if (stage == 2 && all(2) && !uploaded_.contains(id)) {
      if (!closed_shares_) closed_shares_ = session_->CloseShares().ok();
      *step->mutable_inbox() = *session_->InboxFor(id);
      task->set_kind(v1::Task::SECAGG);
    } else if (uploaded_.size() == 3 && !consents_.contains(id)) {
      // The lie: client-2 is told client-3 dropped.
      for (const std::string& s : config_.cohort())
        if (id != "client-2" || s != "client-3") step->mutable_survivors()->add_clients(s);
      task->set_kind(v1::Task::SECAGG);
    } else if (consents_.size() == 3 && !asked_.contains(id)) {
      asked_.insert(id);
      // What each was shown, with every other client's consent.
      for (const std::string& s : config_.cohort())
        if (id != "client-2" || s != "client-3") step->mutable_consents()->add_survivors(s);
      for (const auto& [who, signature] : consents_) {
        if (who == id) continue;
        v1::SecAggConsent* consent = step->mutable_consents()->add_consents();
        consent->set_client(who);
        consent->set_signature(signature);
      }
      task->set_kind(v1::Task::SECAGG);
    }
    if (task->kind() == v1::Task::WAIT) {
      task->clear_secagg();
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::milliseconds(50));  // a short long poll
    }
    return Done<v1::Task>(c);
  }
  grpc::ServerUnaryReactor* Download(grpc::CallbackServerContext* c,
                                     const v1::DownloadRequest* request,
                                     v1::DownloadResponse* response) override {
    std::lock_guard lock(mu_);
    response->set_offset(request->offset());
    response->set_total_size(static_cast<int64_t>(blob_.size()));
    response->set_data(blob_.substr(static_cast<size_t>(request->offset())));
    return Done<v1::DownloadResponse>(c);
  }
  grpc::ServerUnaryReactor* Upload(grpc::CallbackServerContext* c, const v1::UploadRequest* request,
                                   v1::UploadResponse* response) override {
    std::lock_guard lock(mu_);
    const std::string id = Peer(c, "x509_common_name");
    std::string& bytes = parts_[id];
    bytes.resize(static_cast<size_t>(request->total_size()));
    bytes.replace(static_cast<size_t>(request->offset()), request->data().size(), request->data());
    if (request->offset() + static_cast<int64_t>(request->data().size()) == request->total_size()) {
      uploaded_.insert(id);
      response->set_accepted(true);
    }
    response->set_received(request->offset() + static_cast<int64_t>(request->data().size()));
    return Done<v1::UploadResponse>(c);
  }
  grpc::ServerUnaryReactor* Heartbeat(grpc::CallbackServerContext* c, const v1::HeartbeatRequest*,
                                      v1::HeartbeatResponse* response) override {
    response->set_still_wanted(true);
    return Done<v1::HeartbeatResponse>(c);
  }
  grpc::ServerUnaryReactor* SecAgg(grpc::CallbackServerContext* c, const v1::SecAggRequest* request,
                                   v1::SecAggResponse*) override {
    std::lock_guard lock(mu_);
    const std::string id = Peer(c, "x509_common_name");
    absl::Status st;
    if (request->has_keys()) {
      v1::SecAggKeys keys = request->keys();
      keys.set_certificate(Peer(c, "x509_pem_cert"));
      st = session_->AddKeys(id, keys);
    } else if (request->has_shares()) {
      st = session_->AddShares(id, request->shares());
    } else if (request->has_consent()) {
      consents_[id] = request->consent().signature();
    } else if (request->has_reveal()) {
      ++reveals_;
    }
    return Done<v1::SecAggResponse>(
        c, st.ok() ? grpc::Status::OK
                   : grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(st.message())));
  }

 public:
  std::string ca_;

 private:
  std::mutex mu_;
  std::vector<v1::ModuleSpec> modules_;
  std::set<std::string> joined_, uploaded_, asked_;
  std::map<std::string, std::string> parts_, consents_;
  std::string blob_;
  v1::SecAggConfig config_;
  std::optional<secagg::ServerSession> session_;
  bool closed_keys_ = false, closed_shares_ = false;
  int reveals_ = 0;
};

double Distance(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double s = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) s += std::pow(a[i] - b[i], 2);
  return std::sqrt(s);
}

double DdgEpsilon(const std::vector<std::pair<nlohmann::json, int>>& rounds, double delta);

class SecureTest : public FederationTest {
 protected:
  std::vector<float> Export(const std::string& state) const {
    return Tensors(dir_ / state / "export" / "global" / "adapter_model.safetensors");
  }
  // Every regular file's bytes under `state`.
  std::vector<std::string> Files(const std::string& state) const {
    std::vector<std::string> out;
    for (const auto& e : fs::recursive_directory_iterator(dir_ / state))
      if (e.is_regular_file()) out.push_back(ReadText(e.path()));
    return out;
  }
};

// Clients 1–3 hold 150, 250 and 350 examples (the fixture): under secure aggregation each sends
// its change times w = examples / 350, and the weights add up to 750 / 350.
constexpr double kWeights = 750.0 / 350.0;

// One round of fedit and of fed-sb with and without secure aggregation, from the same seeds: the
// clients train the same updates, and the secure export differs from the plain one only by the
// quantisation. Its bound, by hand: each of the n clients' rounding moves each of the R rotated
// values by less than 1/scale, scale = 2^16·√R/clip, so the decoded sum is within
// E = n·√R/scale = n·clip/2^16 of the true one in L2, and the mean within E/Σw. And the secure
// coordinator's state directory holds no bytes of what the clients uploaded in the plain run.
TEST_F(SecureTest, ExportsAreWithinTheQuantisationBoundOfThePlainRun) {
  for (const std::string method : {"fedit", "fed-sb"}) {
    const std::vector<std::string> flags = {"--rounds", "1", "--fed-sb-init", "random"};
    std::vector<std::string> secure = flags;
    for (const char* f : {"--secure-aggregation", "secagg+", "--secagg-clip", "10"})
      secure.push_back(f);
    RunFederation(method, flags, nullptr, method + "-plain", method + "-plain");
    RunFederation(method, secure, nullptr, method + "-secure", method + "-secure");
    const std::vector<nlohmann::json> plain = MetricsOnceThere(method + "-plain", 1);
    const std::vector<nlohmann::json> lines = MetricsOnceThere(method + "-secure", 1);
    ASSERT_EQ(lines.size(), 1u);
    const nlohmann::json& s = lines[0]["secure_aggregation"];
    EXPECT_EQ(s["clients"], 3);
    EXPECT_EQ(s["neighbours"], 2);  // three clients: the complete graph
    EXPECT_EQ(s["threshold"], 2);
    EXPECT_EQ(lines[0]["arrived"].size(), 3u);
    const double bound = 3 * 10.0 / 65536 / kWeights + 1e-6;  // + float32's rounding
    const double d = Distance(Export(method + "-secure"), Export(method + "-plain"));
    EXPECT_LT(d, bound) << method;
    EXPECT_GT(d, 0) << method << ": the quantisation changed nothing?";
    std::cout << method << ": the secure export is " << d << " from the plain one (bound " << bound
              << ")\n";

    // No window of any plain update's tensor bytes is in any file the secure coordinator keeps;
    // the plain coordinator's directory holds them all (the check can fail).
    const std::vector<std::string> secure_files = Files(method + "-secure");
    const std::vector<std::string> plain_files = Files(method + "-plain");
    for (const auto& [client, sha] : plain[0]["updates"].items()) {
      const std::string update = Blob(method + "-plain", sha.get<std::string>());
      ASSERT_GT(update.size(), 8u);
      uint64_t header = 0;
      std::memcpy(&header, update.data(), 8);
      const std::string data = update.substr(8 + header);
      ASSERT_GE(data.size(), 64u) << client;
      for (size_t at = 0; at + 32 <= data.size(); at += std::max<size_t>(32, data.size() / 16)) {
        const std::string window = data.substr(at, 32);
        for (const std::string& f : secure_files)
          EXPECT_EQ(f.find(window), std::string::npos) << client << "'s update, offset " << at;
        EXPECT_TRUE(std::any_of(plain_files.begin(), plain_files.end(), [&](const auto& f) {
          return f.find(window) != std::string::npos;
        }));
      }
    }
  }
}

// Fed-SB initialised from the clients' gradient under secure aggregation: each of the sketch's
// four steps is a secure round of its own (the answers weighted as the plain run weighs them),
// and the run ends with the plain run's export up to the quantisation, propagated through the
// steps' orthonormalisations and SVD — not a linear map, so the bound is a stated tolerance:
// 1e-3 of the export's norm, where the steps' sums are within n·clip/2^16 (L2) of the plain ones.
TEST_F(SecureTest, FedSbSketchInitialisationRunsUnderSecureAggregation) {
  const std::vector<std::string> flags = {"--rounds", "1"};
  std::vector<std::string> secure = flags;
  for (const char* f : {"--secure-aggregation", "secagg+"}) secure.push_back(f);
  RunFederation("fed-sb", flags, nullptr, "plain", "plain");
  RunFederation("fed-sb", secure, nullptr, "secure", "secure");
  EXPECT_THAT(ReadText(dir_ / "secure.log"),
              HasSubstr("fed-sb initialisation step 4 of 4 (project): secure aggregation over 3"));
  const std::vector<float> plain = Export("plain");
  double norm = 0;
  for (float v : plain) norm += static_cast<double>(v) * v;
  const double d = Distance(Export("secure"), plain);
  EXPECT_LT(d, 1e-3 * std::sqrt(norm));
  std::cout << "fed-sb with its sketch initialisation: the secure export is " << d
            << " from the plain one (norm " << std::sqrt(norm) << ")\n";
}

// What a lora-fair round under secure aggregation should commit, from the round's start and the
// clients' trained updates (kept by fedlora-client-faulty --testing-save-updates), each client's
// weight p_k its claimed examples over the sum's: Ā = Σ p_k A_k, B̄ = Σ p_k s_k B_k and, over the
// clients `corrected` that finished the second sum (their weights renormalised),
// G = Σ p_k s_k B_k A_k Āᵀ, solved in Ā's row space (common::SolveLoraFairInRowSpace, checked
// against the dense objective in lora_fair_test). B̄ instead when no client is corrected.
struct Expected {
  std::vector<common::MatrixD> a_bar, b_bar, b;
};
Expected LoraFairExpected(const std::vector<common::Adapter>& updates,
                          const std::vector<double>& examples, const std::vector<bool>& corrected) {
  Expected e;
  double all = 0, summed = 0;
  for (size_t k = 0; k < updates.size(); ++k) {
    all += examples[k];
    summed += corrected[k] ? examples[k] : 0;
  }
  for (size_t i = 0; i < updates[0].num_modules(); ++i) {
    common::MatrixD a = common::MatrixD::Zero(updates[0].A(i).rows(), updates[0].A(i).cols());
    common::MatrixD b = common::MatrixD::Zero(updates[0].B(i).rows(), updates[0].B(i).cols());
    for (size_t k = 0; k < updates.size(); ++k) {
      a += examples[k] / all * updates[k].A(i).cast<double>();
      b += examples[k] / all * updates[k].module(i).scaling * updates[k].B(i).cast<double>();
    }
    common::MatrixD g = common::MatrixD::Zero(b.rows(), b.cols());
    for (size_t k = 0; k < updates.size(); ++k)
      if (corrected[k])
        g += examples[k] / summed * updates[k].module(i).scaling * updates[k].B(i).cast<double>() *
             (updates[k].A(i).cast<double>() * a.transpose());
    e.b.push_back(summed > 0 ? common::SolveLoraFairInRowSpace(g, a, b, {.lambda = 0.01}).b : b);
    e.a_bar.push_back(std::move(a));
    e.b_bar.push_back(std::move(b));
  }
  return e;
}

class SecureLoraFairTest : public SecureTest {
 protected:
  // Clients 1–3 of a lora-fair run under secure aggregation, each keeping its updates; client i
  // also gets extra(i). Every client that is not killed must exit 0, and the coordinator too.
  void Run(const std::vector<std::string>& server_flags,
           const std::function<std::vector<std::string>(int)>& extra) {
    std::vector<std::string> flags = {"--secure-aggregation", "secagg+", "--secagg-clip", "10"};
    flags.insert(flags.end(), server_flags.begin(), server_flags.end());
    const pid_t server = StartServer("lora-fair", "secure", flags);
    ASSERT_FALSE(port_.empty());
    std::vector<std::pair<pid_t, bool>> clients;
    for (int i = 1; i <= 3; ++i) {
      std::vector<std::string> f = {"--testing-save-updates",
                                    (dir_ / ("updates-" + std::to_string(i))).string()};
      const std::vector<std::string> more = extra(i);
      f.insert(f.end(), more.begin(), more.end());
      clients.push_back({StartClient(i, "secure", f, "fedlora-client-faulty"), more.empty()});
    }
    for (const auto& [pid, survives] : clients) {
      if (survives) {
        EXPECT_EQ(Wait(pid, std::chrono::seconds(120)), 0);
      }
    }
    ASSERT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / "secure.log");
  }
  common::Adapter Version(int v) const {
    const auto ledger = nlohmann::json::parse(ReadText(dir_ / "secure" / "ledger.json"));
    auto a = common::DecodeAdapter(Blob("secure", ledger["versions"][v]["blobs"][0]["sha256"]),
                                   "version");
    EXPECT_TRUE(a.ok()) << a.status();
    return a.ok() ? *std::move(a) : common::Adapter{};
  }
  // Round `round`'s updates, and the examples each claimed.
  std::pair<std::vector<common::Adapter>, std::vector<double>> Updates(int round) const {
    const nlohmann::json line = MetricsOnceThere("secure", round)[round - 1];
    std::vector<common::Adapter> updates;
    std::vector<double> examples;
    for (int i = 1; i <= 3; ++i) {
      const std::string id = "client-" + std::to_string(i);
      auto u = common::DecodeAdapter(ReadText(dir_ / ("updates-" + std::to_string(i)) /
                                              ("update-" + std::to_string(round) + ".bin")),
                                     id);
      EXPECT_TRUE(u.ok()) << u.status();
      updates.push_back(u.ok() ? *std::move(u) : common::Adapter{});
      examples.push_back(line["examples"][id].get<double>());
    }
    return {std::move(updates), std::move(examples)};
  }
  // How far version `v`'s A and B are from `want`'s Ā and `b`, in L2 over the modules; and ‖b‖
  // and ‖b − B̄‖.
  struct Distances {
    double a = 0, b = 0, b_norm = 0, correction = 0;
  };
  Distances From(const common::Adapter& got, const Expected& want) const {
    Distances d;
    for (size_t i = 0; i < got.num_modules(); ++i) {
      d.a += (got.A(i).cast<double>() - want.a_bar[i]).squaredNorm();
      d.b += (got.module(i).scaling * got.B(i).cast<double>() - want.b[i]).squaredNorm();
      d.b_norm += want.b[i].squaredNorm();
      d.correction += (want.b[i] - want.b_bar[i]).squaredNorm();
    }
    return {std::sqrt(d.a), std::sqrt(d.b), std::sqrt(d.b_norm), std::sqrt(d.correction)};
  }
};

// The first sum's quantisation bound n·clip/2^16/Σw on the change (A, B) (see
// ExportsAreWithinTheQuantisationBoundOfThePlainRun), + float32's rounding.
const double kFirstSumBound = 3 * 10.0 / 65536 / kWeights + 1e-6;

// Two rounds of lora-fair under secure aggregation: each version is what the formula gives from
// the round's start and the clients' updates (the second round starts from B_0 ≠ 0, so the
// B_0 A_0 Āᵀ the clients subtract and the coordinator adds back must cancel). A is within the first
// sum's quantisation bound of Ā; B comes out of a solver, not a linear map of the sums, so it is
// held to a stated tolerance, 1e-3 of ‖B‖ — the second sum's inputs are within
// n·clip·max‖Ā‖₂/2^16/Σw of the exact ones — and the correction it makes, ‖B − B̄‖, is checked to be
// far larger. The export is also compared with the plain run's (which uses the exact ‖ΔW*‖).
TEST_F(SecureLoraFairTest, EachRoundCorrectsFromASecondSecureSum) {
  Run({"--rounds", "2"}, [](int) { return std::vector<std::string>{}; });
  const std::vector<nlohmann::json> lines = MetricsOnceThere("secure", 2);
  ASSERT_EQ(lines.size(), 2u);
  for (int round = 1; round <= 2; ++round) {
    const nlohmann::json& c = lines[round - 1]["secure_correction"];
    EXPECT_EQ(c["clients"], 3);
    EXPECT_EQ(c["summed"], 3);
    EXPECT_EQ(c["values"], 2 * 20 * 4);  // two modules' G: 20×4 each
    const auto [updates, examples] = Updates(round);
    const Distances d =
        From(Version(round), LoraFairExpected(updates, examples, {true, true, true}));
    EXPECT_LT(d.a, kFirstSumBound) << "round " << round;
    EXPECT_LT(d.b, 1e-3 * d.b_norm) << "round " << round;
    EXPECT_GT(d.correction, 100 * d.b) << "round " << round << ": no correction?";
    std::cout << "lora-fair round " << round << ": A is " << d.a << " from Ā (bound "
              << kFirstSumBound << "), B " << d.b << " from the correction (‖B‖ " << d.b_norm
              << ", ‖B − B̄‖ " << d.correction << ")\n";
  }
  RunFederation("lora-fair", {"--rounds", "2"}, nullptr, "plain", "plain");
  const std::vector<float> secure = Export("secure");
  double norm = 0;
  for (float v : secure) norm += static_cast<double>(v) * v;
  const double distance = Distance(secure, Export("plain"));
  // The clients' A_k, trained from one A_0, stay close to Ā's row space, so the row-space norm
  // moves the correction little — data-dependent, not a bound: 1e-3 of the export's norm.
  EXPECT_LT(distance, 1e-3 * std::sqrt(norm));
  std::cout << "lora-fair: the secure export is " << distance << " from the plain run's (norm "
            << std::sqrt(norm) << ")\n";
}

// Clients lost between the two sums of round 2 (where B_0 ≠ 0, so G's divisor matters): one
// lost, its input is in Ā and B̄ and G is the exact weighted mean of the others' (the second sum's
// weights and divisor are its own survivors'); two lost, the second sum falls below its threshold
// and the round commits Ā, B̄ uncorrected, as it says — it is not retrained (a second sum of the
// same updates over another cohort would reveal their difference).
TEST_F(SecureLoraFairTest, ClientsLostBetweenTheSums) {
  for (const int lost : {1, 2}) {
    SCOPED_TRACE(std::to_string(lost) + " lost");
    Run({"--rounds", "2", "--client-timeout-s", "2"}, [&](int i) {
      return i > 3 - lost ? std::vector<std::string>{"--testing-die-at-secagg", "correction@2"}
                          : std::vector<std::string>{};
    });
    const std::vector<nlohmann::json> lines = MetricsOnceThere("secure", 2);
    ASSERT_EQ(lines.size(), 2u);
    EXPECT_EQ(lines[1]["arrived"].size(), 3u);
    std::vector<bool> corrected = {true, lost < 2, false};
    if (lost == 1) {
      EXPECT_EQ(lines[1]["secure_correction"]["summed"], 2);
    } else {
      EXPECT_FALSE(lines[1].contains("secure_correction"));
      EXPECT_THAT(ReadText(dir_ / "secure.log"), HasSubstr("the round commits Ā, B̄ uncorrected"));
      corrected = {false, false, false};
    }
    const auto [updates, examples] = Updates(2);
    const Distances d = From(Version(2), LoraFairExpected(updates, examples, corrected));
    EXPECT_LT(d.a, kFirstSumBound);
    EXPECT_LT(d.b, lost == 2 ? kFirstSumBound : 1e-3 * d.b_norm);
    std::cout << lost << " lost between round 2's sums: A " << d.a << " from Ā, B " << d.b
              << " from the expected (‖B‖ " << d.b_norm << ")\n";
    fs::remove_all(dir_ / "secure");
    for (int i = 1; i <= 3; ++i) fs::remove_all(dir_ / ("updates-" + std::to_string(i)));
  }
}

// Under distributed DP both sums are releases: ε counts each with the survivors it summed (client-3
// is lost between them: 3, then 2).
TEST_F(SecureTest, LoraFairUnderDistributedDpCountsBothSums) {
  const pid_t server = StartServer("lora-fair", "state",
                                   {"--rounds", "1", "--secure-aggregation", "secagg+", "--dp-clip",
                                    "1", "--dp-noise-multiplier", "1", "--client-timeout-s", "2"});
  ASSERT_FALSE(port_.empty());
  std::vector<pid_t> clients;
  for (int i = 1; i <= 2; ++i) clients.push_back(StartClient(i, "run"));
  const pid_t doomed =
      StartClient(3, "doomed", {"--testing-die-at-secagg", "correction"}, "fedlora-client-faulty");
  EXPECT_NE(Wait(doomed, std::chrono::seconds(120)), 0);
  for (pid_t c : clients) EXPECT_EQ(Wait(c, std::chrono::seconds(120)), 0);
  ASSERT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / "state.log");
  const std::vector<nlohmann::json> lines = MetricsOnceThere("state", 1);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["arrived"].size(), 3u);
  const nlohmann::json &s1 = lines[0]["secure_aggregation"], &s2 = lines[0]["secure_correction"];
  EXPECT_EQ(s2["clients"], 3);
  EXPECT_EQ(s2["summed"], 2);
  ASSERT_TRUE(s2.contains("noise_stddev"));
  const double e = DdgEpsilon({{s1, 3}, {s2, 2}}, 1e-5);
  EXPECT_NEAR(lines[0]["client_dp"]["epsilon"].get<double>(), e, 1e-9 * e);
  EXPECT_GT(e, DdgEpsilon({{s1, 3}}, 1e-5));
  std::cout << "lora-fair under distributed DP: epsilon " << e << " for both sums\n";
}

// A client killed with -9 before each step of the protocol: the round finishes without it (its
// masks removed, or, once its masked input is in, its self mask) once it is silent, and the
// client, restarted, takes part in the next round.
TEST_F(SecureTest, AClientKilledAtEveryStep) {
  for (const std::string step : {"keys", "shares", "input", "consent", "reveal"}) {
    const std::string state = "state-" + step;
    const pid_t server =
        StartServer("fedit", state,
                    {"--rounds", "2", "--secure-aggregation", "secagg+", "--client-timeout-s", "2",
                     "--secagg-step-timeout-s", "20", "--quorum", "0.6"});
    ASSERT_FALSE(port_.empty()) << ReadText(dir_ / (state + ".log"));
    std::vector<pid_t> clients;
    for (int i = 1; i <= 2; ++i) clients.push_back(StartClient(i, step));
    const pid_t doomed = StartClient(3, step + "-doomed", {"--testing-die-at-secagg", step},
                                     "fedlora-client-faulty");
    int status = 0;
    ASSERT_EQ(waitpid(doomed, &status, 0), doomed);
    EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << step;
    // Back once round 1 is over (before, it could still join round 1's keys step).
    ASSERT_EQ(MetricsOnceThere(state, 1).size(), 1u) << ReadText(dir_ / (state + ".log"));
    clients.push_back(StartClient(3, step + "-again"));
    for (int i = 0; i < 3; ++i) EXPECT_EQ(Wait(clients[i], std::chrono::seconds(120)), 0) << step;
    ASSERT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / (state + ".log"));
    const std::vector<nlohmann::json> lines = MetricsOnceThere(state, 2);
    ASSERT_EQ(lines.size(), 2u) << step;
    // Before its masked input arrived, client-3 is not in round 1's sum; after, it is.
    const bool counted = step == "consent" || step == "reveal";
    const nlohmann::json& arrived = lines[0]["arrived"];
    EXPECT_EQ(arrived.size(), counted ? 3u : 2u) << step << ": " << arrived;
    EXPECT_EQ(lines[1]["arrived"].size(), 3u) << step;
  }
}

// ε of the distributed discrete Gaussian by hand (Kairouz, Liu, Steinke 2021, Proposition 14) from
// a round's recorded quantisation: each client's contribution has L2 norm at most clip·scale + √R
// (R the rotated length) and L1 at most the lesser of its square and √R times it, each adds
// N_Z(0, σ²) with σ = noise_stddev·scale, and `summands` of them are summed; the rounds' RDP add,
// and ε(α) = RDP − (ln δ + ln α)/(α − 1) + ln((α − 1)/α), minimised over Opacus' orders.
double DdgEpsilon(const std::vector<std::pair<nlohmann::json, int>>& rounds, double delta) {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  double best = INFINITY;
  for (double a : orders) {
    double rdp = 0;
    for (const auto& [s, n] : rounds) {
      const double r = std::exp2(std::ceil(std::log2(s["values"].get<double>())));
      const double scale = s["scale"].get<double>();
      const double l2 = s["clip"].get<double>() * scale + std::sqrt(r);
      const double l1 = std::min(l2 * l2, l2 * std::sqrt(r));
      const double sigma = s["noise_stddev"].get<double>() * scale;
      double tau = 0;
      for (int k = 1; k < n; ++k) tau += std::exp(-2 * M_PI * M_PI * sigma * sigma * k / (k + 1));
      tau *= 10;
      const double x = l2 / (std::sqrt(n) * sigma), y = l1 / (std::sqrt(n) * sigma);
      rdp += std::min({a / 2 * x * x + tau * r, a / 2 * (x * x + 2 * y * tau + tau * tau * r),
                       a / 2 * std::pow(x + tau * std::sqrt(r), 2)});
    }
    best = std::min(best, rdp - (std::log(delta) + std::log(a)) / (a - 1) + std::log((a - 1) / a));
  }
  return best;
}

// Distributed DP: the clients add the noise, and the ε each round reports is that of the
// survivors actually summed — round 1 loses client-3 before its masked input (2 summands), round 2
// has all three — matching DdgEpsilon; the same round with fewer survivors costs more.
TEST_F(SecureTest, DistributedDpCountsTheSurvivorsNoise) {
  const pid_t server = StartServer(
      "fed-sb", "state",
      {"--rounds", "2", "--fed-sb-init", "random", "--secure-aggregation", "secagg+", "--dp-clip",
       "1", "--dp-noise-multiplier", "1", "--client-timeout-s", "2", "--quorum", "0.6"});
  ASSERT_FALSE(port_.empty());
  std::vector<pid_t> clients;
  for (int i = 1; i <= 2; ++i) clients.push_back(StartClient(i, "run"));
  const pid_t doomed =
      StartClient(3, "doomed", {"--testing-die-at-secagg", "input"}, "fedlora-client-faulty");
  EXPECT_NE(Wait(doomed, std::chrono::seconds(120)), 0);
  ASSERT_EQ(MetricsOnceThere("state", 1).size(), 1u) << ReadText(dir_ / "state.log");
  clients.push_back(StartClient(3, "again"));
  for (pid_t c : clients) EXPECT_EQ(Wait(c, std::chrono::seconds(120)), 0);
  ASSERT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / "state.log");
  const std::vector<nlohmann::json> lines = MetricsOnceThere("state", 2);
  ASSERT_EQ(lines.size(), 2u);
  ASSERT_EQ(lines[0]["arrived"].size(), 2u);
  ASSERT_EQ(lines[1]["arrived"].size(), 3u);
  const nlohmann::json &s1 = lines[0]["secure_aggregation"], &s2 = lines[1]["secure_aggregation"];
  ASSERT_TRUE(s1.contains("noise_stddev"));
  // Each client's σ is z·S/√cohort: 1/√3.
  EXPECT_NEAR(s1["noise_stddev"].get<double>(), 1 / std::sqrt(3.0), 1e-6);
  const double e1 = DdgEpsilon({{s1, 2}}, 1e-5), e12 = DdgEpsilon({{s1, 2}, {s2, 3}}, 1e-5);
  EXPECT_NEAR(lines[0]["client_dp"]["epsilon"].get<double>(), e1, 1e-9 * e1);
  EXPECT_NEAR(lines[1]["client_dp"]["epsilon"].get<double>(), e12, 1e-9 * e12);
  EXPECT_GT(e1, DdgEpsilon({{s1, 3}}, 1e-5));  // two survivors' noise is less than three's
  std::cout << "distributed DP: epsilon " << e1 << " after round 1 (2 survivors), " << e12
            << " after round 2 (3)\n";
}

// An operator removes client-3 while the round waits for its consent: its masked input is in the
// sum already and stays there (the round is unmasked from the others' shares); it takes no
// further part. Under lora-fair that leaves two clients for the second sum, too few for one (each
// would learn the other's term): the round commits Ā, B̄ uncorrected.
TEST_F(SecureTest, AClientRemovedAfterItsInputStaysInTheSum) {
  for (const std::string method : {"fedit", "lora-fair"}) {
    SCOPED_TRACE(method);
    const std::string state = "state-" + method;
    const pid_t server = StartServer(
        method, state,
        {"--rounds", "1", "--secure-aggregation", "secagg+", "--operators", "client-4"});
    ASSERT_FALSE(port_.empty());
    std::vector<pid_t> clients;
    for (int i = 1; i <= 2; ++i) clients.push_back(StartClient(i, method));
    const fs::path pause = dir_ / "pause";
    const pid_t third = StartClient(
        3, method, {"--testing-pause-at-secagg", "consent", "--testing-pause-file", pause.string()},
        "fedlora-client-faulty");
    ASSERT_FALSE(WaitForFile(pause, std::chrono::seconds(60)).empty());
    const CommandResult removed =
        RunProgram({kBin + "/fedlora-client", "--coordinator", "localhost:" + port_, "--ca",
                    Cert("ca.pem"), "--cert", Cert("client-4.pem"), "--key", Cert("client-4.key"),
                    "--admin", "remove", "--admin-client", "client-3", "--admin-reason", "test"});
    EXPECT_EQ(removed.exit_code, 0) << removed.output;
    fs::remove(pause);
    EXPECT_NE(Wait(third, std::chrono::seconds(60)), 0);  // refused: removed
    for (pid_t c : clients) EXPECT_EQ(Wait(c, std::chrono::seconds(120)), 0);
    ASSERT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / (state + ".log"));
    const std::vector<nlohmann::json> lines = MetricsOnceThere(state, 1);
    ASSERT_EQ(lines.size(), 1u);
    EXPECT_EQ(lines[0]["arrived"].size(), 3u) << lines[0]["arrived"];
    if (method == "lora-fair") {
      EXPECT_FALSE(lines[0].contains("secure_correction"));
      EXPECT_THAT(ReadText(dir_ / (state + ".log")),
                  HasSubstr("lora-fair's correction cannot run"));
    }
  }
}

// A coordinator killed mid-protocol keeps no key material: restarted on its state directory, it
// runs the round anew with fresh keys, and the clients follow.
TEST_F(SecureTest, ACoordinatorRestartedMidProtocolRunsTheRoundAnew) {
  const std::vector<std::string> flags = {"--rounds", "1", "--secure-aggregation", "secagg+"};
  pid_t server = StartServer("fedit", "state", flags);
  ASSERT_FALSE(port_.empty());
  const std::string port = port_;
  std::vector<pid_t> clients;
  for (int i = 1; i <= 2; ++i) clients.push_back(StartClient(i, "run"));
  const fs::path pause = dir_ / "pause";
  clients.push_back(StartClient(
      3, "run", {"--testing-pause-at-secagg", "consent", "--testing-pause-file", pause.string()},
      "fedlora-client-faulty"));
  ASSERT_FALSE(WaitForFile(pause, std::chrono::seconds(60)).empty());
  kill(server, SIGKILL);
  waitpid(server, nullptr, 0);
  server = StartServer("fedit", "state2",
                       {"--rounds", "1", "--secure-aggregation", "secagg+", "--state-dir",
                        (dir_ / "state").string(), "--listen", "127.0.0.1:" + port});
  fs::remove(pause);
  for (pid_t c : clients) EXPECT_EQ(Wait(c, std::chrono::seconds(120)), 0);
  ASSERT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / "state2.log");
  const std::vector<nlohmann::json> lines = MetricsOnceThere("state", 1);
  ASSERT_EQ(lines.size(), 1u);
  EXPECT_EQ(lines[0]["arrived"].size(), 3u);
  EXPECT_THAT(ReadText(dir_ / "state2.log"), HasSubstr("round 1: secure aggregation over 3"));
}

// The consistency round, with real clients: a coordinator that shows client-2 another survivor
// set than client-1 and client-3 is caught by all three, each of which stops with an error and
// reveals nothing.
TEST_F(SecureTest, ACoordinatorThatShowsTwoSurvivorSetsIsCaught) {
  LyingCoordinator liar;
  liar.ca_ = Cert("ca.pem");
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(
      "127.0.0.1:0",
      *common::ServerTlsCredentials(Cert("server.pem"), Cert("server.key"), Cert("ca.pem")), &port);
  builder.RegisterService(&liar);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_GT(port, 0);
  port_ = std::to_string(port);
  std::vector<pid_t> clients;
  for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, "lied-to"));
  for (int i = 0; i < 3; ++i) {
    const std::string log = "lied-to-client" + std::to_string(i + 1) + ".log";
    EXPECT_NE(Wait(clients[i], std::chrono::seconds(60)), 0) << ReadText(dir_ / log);
    EXPECT_THAT(ReadText(dir_ / log), HasSubstr("revealing nothing more"));
  }
  EXPECT_EQ(liar.reveals(), 0);
  server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
}

// What secure aggregation cannot do is refused at start, saying why.
TEST_F(SecureTest, WhatCannotRunUnderSecureAggregationIsRefused) {
  const auto refused = [&](std::vector<std::string> extra, const std::string& why) {
    std::vector<std::string> argv = {
        kBin + "/fedlora-server", "--secure-aggregation", "secagg+",          "--state-dir",
        (dir_ / "x").string(),    "--tls-cert",           Cert("server.pem"), "--tls-key",
        Cert("server.key")};
    argv.insert(argv.end(), extra.begin(), extra.end());
    const CommandResult r = RunProgram(argv);
    EXPECT_EQ(r.exit_code, 2) << r.output;
    EXPECT_THAT(r.output, HasSubstr(why));
  };
  refused({"--method", "flora", "--client-ca", Cert("ca.pem")}, "stacking needs each client's");
  refused({"--method", "fedit"}, "needs mutual TLS");
  refused({"--method", "fedit", "--client-ca", Cert("ca.pem"), "--max-update-norm-ratio", "5"},
          "max_update_norm_ratio cannot be applied under secure aggregation");
  refused(
      {"--method", "fedit", "--client-ca", Cert("ca.pem"), "--dp-clip", "1", "--dp-adaptive-clip"},
      "dp_adaptive_clip needs each client's clipping bit");
}

}  // namespace
}  // namespace fedlora
