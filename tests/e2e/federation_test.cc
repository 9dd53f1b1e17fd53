// Federations of real processes — fedlora-server and fedlora-client — over real sockets with mutual
// TLS and certificates made by deploy/make_certs.sh. Each round's aggregate is recomputed here,
// with dense products, from the client updates the coordinator stored (named in its metrics), and
// compared with the version it published.
#include <arpa/inet.h>
#include <fmt/format.h>
#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/statvfs.h>

#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>

#include "client/client_options.h"
#include "client/workloads/regression_workload.h"
#include "common/base/file_util.h"
#include "common/net/tls.h"
#include "common/privacy/privacy_accountant.h"
#include "common/tensor/blob.h"
#include "common/tensor/peft.h"
#include "common/tensor/safetensors.h"
#include "fedlora/v1/coordinator.grpc.pb.h"
#include "tests/process.h"
#include "tests/test_util.h"

namespace fedlora {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::MatrixD;
using ::testing::Not;

const std::string kBin = FEDLORA_BIN_DIR;
const std::string kSource = FEDLORA_SOURCE_DIR;

// argv of `program` with `defaults` ("--flag", value) overridden or extended by `extra` ("--flag",
// "value" pairs, or a lone "--flag"): CLI11 refuses a repeated single-value flag.
std::vector<std::string> WithFlags(const std::string& program,
                                   std::vector<std::pair<std::string, std::string>> flags,
                                   const std::vector<std::string>& extra) {
  for (size_t i = 0; i < extra.size(); ++i) {
    const bool has_value = i + 1 < extra.size() && !extra[i + 1].starts_with("--");
    const std::string value = has_value ? extra[i + 1] : "";
    auto it = std::find_if(flags.begin(), flags.end(),
                           [&](const auto& f) { return f.first == extra[i]; });
    if (it != flags.end()) {
      it->second = value;
    } else {
      flags.emplace_back(extra[i], value);
    }
    if (has_value) ++i;
  }
  std::vector<std::string> argv = {program};
  for (const auto& [flag, value] : flags) {
    argv.push_back(flag);
    if (!value.empty()) argv.push_back(value);
  }
  return argv;
}

class FederationTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string cmd =
        "bash " + kSource + "/deploy/make_certs.sh " + (dir_ / "certs").string() + " 4 > /dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0);
  }
  std::string Cert(const std::string& name) const { return (dir_ / "certs" / name).string(); }

  // Starts a coordinator for `method` on a free port; returns its pid and sets port_.
  pid_t StartServer(const std::string& method, const std::string& state,
                    std::vector<std::string> extra = {}) {
    // Defaults, overridden by `extra` ("--flag", "value" pairs, or a lone "--flag").
    std::vector<std::pair<std::string, std::string>> flags = {
        {"--method", method},
        {"--rounds", "3"},
        {"--min-clients", "3"},
        {"--state-dir", (dir_ / state).string()},
        {"--listen", "127.0.0.1:0"},
        {"--port-file", (dir_ / (state + ".port")).string()},
        {"--tls-cert", Cert("server.pem")},
        {"--tls-key", Cert("server.key")},
        {"--client-ca", Cert("ca.pem")},
        {"--linger-s", "1"},
        {"--rank", "4"},
        {"--lora-alpha", "8"},
        {"--local-steps", "20"},
        {"--learning-rate", "0.1"},
        {"--seed", "11"}};
    std::vector<std::string> argv = WithFlags(kBin + "/fedlora-server", flags, extra);
    fs::remove(dir_ / (state + ".port"));
    const pid_t pid = Track(testing::Start(argv, dir_ / (state + ".log")));
    port_ = testing::WaitForFile(dir_ / (state + ".port"), std::chrono::seconds(10));
    while (!port_.empty() && port_.back() == '\n') port_.pop_back();
    return pid;
  }
  // `program`: fedlora-client, or the tests' build of it with fault hooks (fedlora-client-faulty).
  pid_t StartClient(int i, const std::string& tag, std::vector<std::string> extra = {},
                    const std::string& program = "fedlora-client") {
    const std::string n = std::to_string(i);
    const std::vector<std::string> argv =
        WithFlags(kBin + "/" + program,
                  {{"--coordinator", "localhost:" + port_},
                   {"--ca", Cert("ca.pem")},
                   {"--cert", Cert("client-" + n + ".pem")},
                   {"--key", Cert("client-" + n + ".key")},
                   {"--data-seed", n},
                   {"--examples", std::to_string(100 * i + 50)},
                   {"--layers", "2"},
                   {"--in-features", "24"},
                   {"--out-features", "20"},
                   {"--out-dir", (dir_ / (tag + "-out" + n)).string()},
                   {"--privacy-ledger", (dir_ / (tag + "-ledger" + n + ".json")).string()}},
                  extra);
    return Track(testing::Start(argv, dir_ / (tag + "-client" + std::to_string(i) + ".log")));
  }
  std::vector<nlohmann::json> Metrics(const std::string& state) const {
    std::vector<nlohmann::json> lines;
    std::stringstream in(testing::ReadText(dir_ / state / "metrics.jsonl"));
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
    return lines;
  }
  // The metrics lines once there are `n` (the coordinator's follow-up writes them on a thread of
  // its own, after the commit a test saw); what there is after 30 s otherwise.
  std::vector<nlohmann::json> MetricsOnceThere(const std::string& state, size_t n) const {
    for (int t = 0; t < 600 && Metrics(state).size() < n; ++t)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    return Metrics(state);
  }
  // A coordinator for `method` ("state") and clients 1–3 ("run", each with client_flags(i)), until
  // all of them exit; every one must exit 0.
  using ClientFlags = std::function<std::vector<std::string>(int)>;
  void RunFederation(const std::string& method, std::vector<std::string> server_flags,
                     const ClientFlags& client_flags = nullptr) {
    const pid_t server = StartServer(method, "state", std::move(server_flags));
    ASSERT_FALSE(port_.empty()) << testing::ReadText(dir_ / "state.log");
    std::vector<pid_t> clients;
    for (int i = 1; i <= 3; ++i)
      clients.push_back(
          StartClient(i, "run", client_flags ? client_flags(i) : std::vector<std::string>{}));
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(testing::Wait(clients[i], std::chrono::seconds(120)), 0)
          << testing::ReadText(dir_ / ("run-client" + std::to_string(i + 1) + ".log"));
    }
    ASSERT_EQ(testing::Wait(server, std::chrono::seconds(60)), 0)
        << testing::ReadText(dir_ / "state.log");
  }
  std::string Blob(const std::string& state, const std::string& sha) const {
    return testing::ReadText(dir_ / state / "blobs" / sha);
  }

  // Every process a test started is killed and reaped here, so a failed assertion never leaves one
  // running.
  void TearDown() override {
    for (pid_t pid : started_) {
      if (kill(pid, 0) == 0) {
        kill(pid, SIGKILL);
        waitpid(pid, nullptr, 0);
      }
    }
  }
  pid_t Track(pid_t pid) {
    started_.push_back(pid);
    return pid;
  }

  testing::ScratchDir dir_;
  std::string port_;
  std::vector<pid_t> started_;
};

// Runs a whole federation of 3 clients × 3 rounds and checks every round's aggregate against its
// formula.
class EveryMethod : public FederationTest, public ::testing::WithParamInterface<std::string> {};

// FedIT of two updates with equal example counts: every module of `global` is B̄·Ā of their plain
// means.
void ExpectPlainFedItMean(const common::Adapter& global, const common::Adapter& u1,
                          const common::Adapter& u2) {
  ASSERT_EQ(global.num_modules(), u1.num_modules());
  for (size_t i = 0; i < global.num_modules(); ++i) {
    const MatrixD a_bar = (u1.A(i).cast<double>() + u2.A(i).cast<double>()) / 2,
                  b_bar =
                      u1.module(i).scaling * (u1.B(i).cast<double>() + u2.B(i).cast<double>()) / 2;
    EXPECT_LT(testing::RelativeDiff(testing::DenseDelta(global, i), b_bar * a_bar), 1e-5);
  }
}

TEST_P(EveryMethod, AggregatesAreTheFormulaOfWhatClientsUploaded) {
  const std::string method = GetParam();
  RunFederation(method, {});

  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 3u);
  common::Adapter frozen;
  if (method == "fed-sb") {
    const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "state" / "ledger.json"));
    frozen = *common::DecodeAdapter(Blob("state", ledger["versions"][0]["blobs"][0]["sha256"]),
                                    "frozen");
  }
  double first_loss = 0, last_loss = 0;
  for (const auto& m : metrics) {
    ASSERT_EQ(m["arrived"].size(), 3u);
    std::vector<common::Adapter> updates;
    std::vector<double> p;
    double total = 0;
    for (const auto& [id, sha] : m["updates"].items()) {
      const std::string bytes = Blob("state", sha);
      updates.push_back(method == "fed-sb" ? *common::DecodeROnto(bytes, id, frozen)
                                           : *common::DecodeAdapter(bytes, id));
      p.push_back(m["examples"][id].get<double>());
      total += p.back();
      if (method == "fed-sb") {
        // Only R travels: 2 modules × r² f32 values, plus the safetensors header.
        EXPECT_LE(m["bytes_up"][id].get<int64_t>(), 2 * 4 * 4 * 4 + 512);
      }
    }
    for (double& x : p) x /= total;
    const std::string global_bytes = Blob("state", m["global_blob"]);
    const common::Adapter global = method == "fed-sb"
                                       ? *common::DecodeROnto(global_bytes, "global", frozen)
                                       : *common::DecodeAdapter(global_bytes, "global");
    for (size_t i = 0; i < global.num_modules(); ++i) {
      MatrixD ideal = MatrixD::Zero(20, 24), a_bar = MatrixD::Zero(4, 24),
              b_bar = MatrixD::Zero(20, 4);
      for (size_t k = 0; k < updates.size(); ++k) {
        ideal += p[k] * testing::DenseDelta(updates[k], i);
        a_bar += p[k] * updates[k].A(i).cast<double>();
        b_bar += p[k] * updates[k].module(i).scaling * updates[k].B(i).cast<double>();
      }
      const MatrixD got = testing::DenseDelta(global, i);
      if (method == "fedit") {
        EXPECT_LT(testing::RelativeDiff(got, b_bar * a_bar), 1e-5);
      }
      if (method == "flora" || method == "fed-sb") {
        EXPECT_LT(testing::RelativeDiff(got, ideal), 1e-5);
      }
      if (method == "lora-fair") {
        EXPECT_LT(testing::RelativeDiff(global.A(i).cast<double>(), a_bar), 1e-6);  // Ā kept
        auto objective = [&](const MatrixD& b) {
          const MatrixD w = b * a_bar;
          return 1 - (w.array() * ideal.array()).sum() / (w.norm() * ideal.norm()) +
                 0.01 * (b - b_bar).squaredNorm();
        };
        EXPECT_LT(objective(global.B(i).cast<double>()), objective(b_bar));
      }
    }
    (first_loss == 0 ? first_loss : last_loss) = m["mean_loss_before"].get<double>();
  }
  EXPECT_LT(last_loss, first_loss);  // the global model improves on the clients' data
  EXPECT_TRUE(fs::exists(dir_ / "state" / "export" / "global" / "adapter_model.safetensors"));
  if (method == "flora") {
    // The rank-r export is the truncated SVD of the summed deltas: its dense error is the dropped
    // energy.
    const auto global = common::ReadPeftAdapter(dir_ / "state" / "export" / "global");
    const auto cut = common::ReadPeftAdapter(dir_ / "state" / "export" / "global-rank4");
    const auto energy = nlohmann::json::parse(
        testing::ReadText(dir_ / "state" / "export" / "retained_energy.json"));
    ASSERT_TRUE(global.ok() && cut.ok()) << global.status() << cut.status();
    EXPECT_EQ(global->module(0).rank, 3 * 3 * 4);  // 3 rounds × 3 clients × rank 4
    for (size_t i = 0; i < cut->num_modules(); ++i) {
      EXPECT_EQ(cut->module(i).rank, 4);
      const MatrixD full = testing::DenseDelta(*global, i), approx = testing::DenseDelta(*cut, i);
      const double kept = energy["modules"][cut->module(i).name].get<double>();
      EXPECT_GT(kept, 0.0);
      EXPECT_LE(kept, 1.0);
      EXPECT_NEAR((full - approx).squaredNorm(), (1 - kept) * full.squaredNorm(),
                  1e-5 * full.squaredNorm());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, EveryMethod,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// Client-level DP over the coordinator: each round's published state is recomputed here from the
// stored updates (Δ_k against the previous version, flat clipping, the cohort as divisor), and what
// is left over must be Gaussian noise of stddev z·S/m; ε per round is the accountant's for q = 1.
class ClientLevelDp : public FederationTest, public ::testing::WithParamInterface<std::string> {
 protected:
  // The previous state, the metrics line's updates and its published state.
  struct Round {
    common::Adapter start, global;
    std::vector<common::Adapter> updates;
  };
  std::vector<Round> Rounds(const std::string& method) {
    const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "state" / "ledger.json"));
    const std::string v0 = Blob("state", ledger["versions"][0]["blobs"][0]["sha256"]);
    const common::Adapter zero = *common::DecodeAdapter(v0, "version 0");  // Fed-SB: frozen, R = 0
    auto decode = [&](const std::string& bytes) {
      return method == "fed-sb" ? *common::DecodeROnto(bytes, "blob", zero)
                                : *common::DecodeAdapter(bytes, "blob");
    };
    std::vector<Round> rounds;
    common::Adapter start = zero;
    for (const auto& m : Metrics("state")) {
      Round r{start, decode(Blob("state", m["global_blob"])), {}};
      for (const auto& [id, sha] : m["updates"].items())
        r.updates.push_back(decode(Blob("state", sha)));
      start = r.global;
      rounds.push_back(std::move(r));
    }
    return rounds;
  }
  // Δ of an update against the round's start, flat: (A − A0, s·B − B0) per module, or s·R − R0.
  // With `a_only`, only the A parts (LoRA-FAIR corrects B afterwards).
  static Eigen::VectorXd Delta(const common::Adapter& u, const common::Adapter& start,
                               bool a_only = false) {
    std::vector<double> out;
    auto put = [&](const MatrixD& d) { out.insert(out.end(), d.data(), d.data() + d.size()); };
    for (size_t i = 0; i < u.num_modules(); ++i) {
      const double s = u.module(i).scaling;
      if (u.module(i).has_r) {
        put(s * u.R(i).cast<double>() - start.R(i).cast<double>());
        continue;
      }
      put(u.A(i).cast<double>() - start.A(i).cast<double>());
      if (!a_only) put(s * u.B(i).cast<double>() - start.B(i).cast<double>());
    }
    return Eigen::Map<Eigen::VectorXd>(out.data(), static_cast<Eigen::Index>(out.size()));
  }
};

TEST_P(ClientLevelDp, RoundsAreTheClippedNoisedMeanAndStopAtTheTargetEpsilon) {
  const std::string method = GetParam();
  // Round 1 starts from the same state every time, so its update norms repeat: these clips fall
  // between them (fedit, lora-fair 1.96–2.52; fed-sb 1.127–1.164).
  const double clip = method == "fed-sb" ? 1.15 : 2.2;
  const double z = 0.8, delta = 1e-5, steps = method == "lora-fair" ? 2 : 1;
  auto epsilon = [&](int rounds) {
    return common::EpsilonFor(1.0, z, steps * rounds, delta)->epsilon;
  };
  const double target = (epsilon(2) + epsilon(3)) / 2;  // two of the four rounds fit
  // fed-sb from random B, A: ε here counts rounds only (FedSbInitTest counts the initialisation).
  RunFederation(method, {"--rounds", "4", "--dp-clip", std::to_string(clip),
                         "--dp-noise-multiplier", std::to_string(z), "--dp-target-epsilon",
                         std::to_string(target), "--fed-sb-init", "random"});
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 2u) << testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(testing::ReadText(dir_ / "state.log"), HasSubstr("no more rounds are run"));
  const std::vector<Round> rounds = Rounds(method);
  double sq = 0, n = 0;
  int clipped = 0, unclipped = 0;
  for (size_t t = 0; t < rounds.size(); ++t) {
    const nlohmann::json& dp = metrics[t]["client_dp"];
    EXPECT_NEAR(dp["epsilon"].get<double>(), epsilon(static_cast<int>(t) + 1),
                1e-9 * epsilon(static_cast<int>(t) + 1));
    EXPECT_EQ(dp["sample_rate"].get<double>(), 1.0);
    EXPECT_EQ(dp["clip"].get<double>(), clip);
    const Round& r = rounds[t];
    // Clipping is decided on the whole Δ (A and B); LoRA-FAIR's published B is corrected, so only
    // its A is compared.
    const bool a_only = method == "lora-fair";
    Eigen::VectorXd sum = Eigen::VectorXd::Zero(Delta(r.start, r.start, a_only).size());
    for (const common::Adapter& u : r.updates) {
      const double norm = Delta(u, r.start).norm();
      (norm > clip ? clipped : unclipped)++;
      sum += std::min(1.0, clip / (norm + 1e-6)) * Delta(u, r.start, a_only);
    }
    const Eigen::VectorXd noise = (Delta(r.global, r.start, a_only) - sum / 3) / (z * clip / 3);
    sq += noise.squaredNorm();
    n += static_cast<double>(noise.size());
  }
  EXPECT_GT(clipped, 0);
  EXPECT_GT(unclipped, 0);
  // The standardised leftover has mean square 1 (5-sigma bounds: χ²_n/n ~ N(1, 2/n)).
  EXPECT_LT(std::abs(sq / n - 1), 5 * std::sqrt(2 / n)) << "n = " << n;
  // The operator's summary says what was spent.
  const std::string summary = (dir_ / "summary.txt").string();
  ASSERT_EQ(std::system(
                (kBin + "/fedlora summary " + (dir_ / "state").string() + " > " + summary).c_str()),
            0);
  EXPECT_THAT(testing::ReadText(summary),
              HasSubstr(fmt::format("client-level epsilon {:.4f} at delta 1e-05", epsilon(2))));
}

INSTANTIATE_TEST_SUITE_P(Methods, ClientLevelDp, ::testing::Values("fedit", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// Adaptive clipping without noise (z = 0, σ_b = 0) is deterministic: every round is the clipped
// mean at the round's C, and C moves by C·exp(−η(b̄ − γ)) with b̄ the share of updates within C.
TEST_F(ClientLevelDp, AdaptiveClipFollowsTheQuantileOfTheUpdateNorms) {
  const double c0 = 1.0, eta = 0.3, gamma = 0.5;
  RunFederation("fedit",
                {"--dp-clip", std::to_string(c0), "--dp-adaptive-clip", "--dp-clip-learning-rate",
                 std::to_string(eta), "--dp-count-stddev", "0"});
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 3u);
  const std::vector<Round> rounds = Rounds("fedit");
  double clip = c0;
  for (size_t t = 0; t < rounds.size(); ++t) {
    const nlohmann::json& dp = metrics[t]["client_dp"];
    EXPECT_NEAR(dp["clip"].get<double>(), clip, 1e-12 * clip);
    Eigen::VectorXd sum = Eigen::VectorXd::Zero(Delta(rounds[t].start, rounds[t].start).size());
    double within = 0;
    for (const common::Adapter& u : rounds[t].updates) {
      const double norm = Delta(u, rounds[t].start).norm();
      within += norm <= clip;
      sum += std::min(1.0, clip / (norm + 1e-6)) * Delta(u, rounds[t].start);
    }
    EXPECT_LT((Delta(rounds[t].global, rounds[t].start) - sum / 3).norm(), 1e-5 * sum.norm() / 3);
    clip *= std::exp(-eta * (within / 3 - gamma));
    EXPECT_NEAR(dp["next_clip"].get<double>(), clip, 1e-12 * clip);
    EXPECT_TRUE(dp["epsilon"].is_null());  // no noise: ε is infinite, which JSON writes as null
  }
}

int FreePort();  // below

// kill -9 of the coordinator mid-run: restarted on its state directory, it goes on counting the
// privacy already spent and carries the adaptive clip over.
TEST_F(ClientLevelDp, ARestartedCoordinatorKeepsCountingAndKeepsItsClip) {
  port_ = std::to_string(FreePort());
  const double z = 0.5;
  const std::vector<std::string> flags = {"--listen",
                                          "127.0.0.1:" + port_,
                                          "--rounds",
                                          "4",
                                          "--local-steps",
                                          "300",
                                          "--dp-clip",
                                          "1",
                                          "--dp-noise-multiplier",
                                          std::to_string(z),
                                          "--dp-adaptive-clip",
                                          "--dp-count-stddev",
                                          "1",
                                          "--fed-sb-init",
                                          "random"};
  pid_t server = StartServer("fed-sb", "state", flags);
  std::vector<pid_t> clients;
  for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, "run"));
  for (int t = 0; t < 1000 && Metrics("state").empty(); ++t)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_LT(Metrics("state").size(), 4u) << "the run ended before the coordinator could be killed";
  kill(server, SIGKILL);
  testing::Wait(server, std::chrono::seconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  server = StartServer("fed-sb", "state", flags);
  ASSERT_FALSE(port_.empty());
  for (pid_t c : clients) EXPECT_EQ(testing::Wait(c, std::chrono::seconds(90)), 0);
  ASSERT_EQ(testing::Wait(server, std::chrono::seconds(30)), 0)
      << testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(testing::ReadText(dir_ / "state.log"), HasSubstr("continuing run"));
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 4u);
  for (size_t t = 0; t < metrics.size(); ++t) {
    const nlohmann::json& dp = metrics[t]["client_dp"];
    const double want = common::EpsilonFor(1.0, z, static_cast<double>(t + 1), 1e-5)->epsilon;
    EXPECT_NEAR(dp["epsilon"].get<double>(), want, 1e-9 * want) << "round " << t + 1;
    if (t > 0) {
      EXPECT_EQ(dp["clip"], metrics[t - 1]["client_dp"]["next_clip"]) << "round " << t + 1;
    }
  }
}

// The regression workload's DP-SGD over the coordinator: every client reports the accountant's ε
// for q and local steps × rounds, and the global model still improves.
TEST_F(FederationTest, RegressionClientsRunDpSgdAndReportEpsilonEachRound) {
  const double q = 0.2, sigma = 1.0;
  RunFederation("fedit", {}, [](int) {
    return std::vector<std::string>{"--dp-noise-multiplier", "1",  "--dp-clip", "1",
                                    "--dp-sample-rate",      "0.2"};
  });
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 3u);
  for (size_t t = 0; t < metrics.size(); ++t) {
    const double want = common::EpsilonFor(q, sigma, 20.0 * (t + 1), 1e-5)->epsilon;
    ASSERT_EQ(metrics[t]["dp_epsilon"].size(), 3u) << metrics[t].dump();
    for (const auto& [id, eps] : metrics[t]["dp_epsilon"].items())
      EXPECT_NEAR(eps.get<double>(), want, 1e-9 * want) << id << " round " << t + 1;
  }
  EXPECT_LT(metrics.back()["mean_loss_before"].get<double>(),
            metrics.front()["mean_loss_before"].get<double>());
  EXPECT_THAT(testing::ReadText(dir_ / "run-client1.log"), HasSubstr("DP-SGD spent epsilon"));
}

TEST_F(FederationTest, ClientRefusesDpSettingsItCannotHonour) {
  auto client = [&](const std::string& tag, std::vector<std::string> args) {
    args.insert(args.begin(), {kBin + "/fedlora-client", "--insecure"});
    const pid_t pid = Track(testing::Start(args, dir_ / (tag + ".log")));
    EXPECT_EQ(testing::Wait(pid, std::chrono::seconds(10)), 2) << tag;
    return testing::ReadText(dir_ / (tag + ".log"));
  };
  EXPECT_THAT(client("command", {"--workload", "command", "--dp-noise-multiplier", "1"}),
              HasSubstr("a command workload's program must do its own"));
  EXPECT_THAT(client("target", {"--target-epsilon", "3"}),
              HasSubstr("--target-epsilon needs DP-SGD (--dp-noise-multiplier)"));
  EXPECT_THAT(client("clip", {"--dp-noise-multiplier", "1", "--dp-clip", "0"}),
              HasSubstr("--dp-clip must be > 0"));
}

TEST_F(FederationTest, FloraWithClientLevelDpIsRefusedWithTheReason) {
  const std::vector<std::string> argv = {
      kBin + "/fedlora-server", "--method", "flora", "--insecure", "--dp-clip", "1", "--state-dir",
      (dir_ / "state").string()};
  const pid_t pid = Track(testing::Start(argv, dir_ / "flora.log"));
  EXPECT_NE(testing::Wait(pid, std::chrono::seconds(10)), 0);
  EXPECT_THAT(testing::ReadText(dir_ / "flora.log"),
              HasSubstr("the coordinator needs each client's own factors"));
  EXPECT_THAT(testing::ReadText(dir_ / "flora.log"), HasSubstr("DP-SGD"));
}

TEST_F(FederationTest, FloraClientsEndWithTheSameMergedBase) {
  RunFederation("flora", {});
  std::vector<std::vector<float>> bases;
  for (int i = 1; i <= 3; ++i) {
    auto file =
        common::SafetensorsFile::Open(dir_ / ("run-out" + std::to_string(i)) / "base.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    std::vector<float> all;
    for (const auto& t : file->view().tensors()) {
      std::vector<float> v(static_cast<size_t>(t.num_elements()));
      file->view().ReadF32(t, v);
      all.insert(all.end(), v.begin(), v.end());
    }
    bases.push_back(std::move(all));
  }
  double max_diff = 0;
  for (size_t j = 0; j < bases[0].size(); ++j) {
    max_diff = std::max({max_diff, std::abs(double(bases[0][j]) - bases[1][j]),
                         std::abs(double(bases[0][j]) - bases[2][j])});
  }
  EXPECT_LT(max_diff, 1e-6);
}

// Who may not take part is told why at once, and the client exits with kExitRefused (3) instead of
// retrying for --max-retry-s (300 s): no certificate, another CA's, an expired or not yet valid one
// (checked before connecting), a coordinator this client's CA does not vouch for, an identity not
// on the allow-list, an operator's. An operator may ask for the status; a client may not, then.
TEST_F(FederationTest, RefusesWhoShouldNotBeLetIn) {
  const pid_t server = StartServer(
      "fedit", "state", {"--allowed-clients", "client-1,client-2", "--operators", "client-3"});
  ASSERT_FALSE(port_.empty());
  // Another CA's certificates; client-1's key in certificates of the run's CA that expired, and
  // that are valid only from 2099 on.
  const std::string other = (dir_ / "other").string();
  std::ofstream(dir_ / "dated.sh") << "set -e; cd " << (dir_ / "certs") << R"(
    printf '[ca]\ndefault_ca=x\n[x]\ndatabase=index\nnew_certs_dir=.\nserial=serial\ndefault_md=sha256\n' > ca.cnf
    printf 'unique_subject=no\npolicy=p\n[p]\ncommonName=supplied\n' >> ca.cnf
    : > index; echo 1000 > serial
    openssl req -new -key client-1.key -subj /CN=client-1 -out dated.csr 2> /dev/null
    sign() { openssl ca -batch -config ca.cnf -cert ca.pem -keyfile ca.key -in dated.csr -notext "$@" 2> /dev/null; }
    sign -out expired.pem -startdate 20200101000000Z -enddate 20210101000000Z
    sign -out future.pem -startdate 20990101000000Z -enddate 21000101000000Z
)";
  ASSERT_EQ(std::system(("bash " + kSource + "/deploy/make_certs.sh " + other +
                         " 1 > /dev/null && bash " + (dir_ / "dated.sh").string())
                            .c_str()),
            0);
  auto client = [&](const std::string& tag, std::vector<std::string> args) {
    std::vector<std::string> argv = {kBin + "/fedlora-client", "--coordinator",
                                     "localhost:" + port_};
    argv.insert(argv.end(), args.begin(), args.end());
    const pid_t pid = Track(testing::Start(argv, dir_ / (tag + ".log")));
    const int code = testing::Wait(pid, std::chrono::seconds(30));
    return std::make_pair(code, testing::ReadText(dir_ / (tag + ".log")));
  };
  auto as = [&](const std::string& pem, const std::string& key,
                std::vector<std::string> more = {}) {
    std::vector<std::string> args = {"--ca", Cert("ca.pem"), "--cert", pem, "--key", key};
    args.insert(args.end(), more.begin(), more.end());
    return args;
  };
  // A good client joins first and pins the run's base model.
  const pid_t good = StartClient(1, "good");
  for (int t = 0; t < 200 && testing::ReadText(dir_ / "state.log").find("client-1 joined") ==
                                 std::string::npos;
       ++t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const std::vector<std::pair<std::vector<std::string>, std::string>> refused = {
      {{"--ca", Cert("ca.pem")},
       "the coordinator closed the connection right after the TLS handshake: it does not accept a "
       "client without a certificate"},
      {as(other + "/client-1.pem", other + "/client-1.key"),
       "it does not accept this client's certificate " + other +
           "/client-1.pem (signed by another CA"},
      {as(Cert("expired.pem"), Cert("client-1.key")),
       "expired.pem expired on 2021-01-01 00:00:00 UTC; it needs a new certificate"},
      {as(Cert("future.pem"), Cert("client-1.key")), "is not valid before 2099-01-01 00:00:00 UTC"},
      {{"--ca", other + "/ca.pem", "--cert", Cert("client-2.pem"), "--key", Cert("client-2.key")},
       "the coordinator's certificate is not trusted by " + other + "/ca.pem"},
      {as(Cert("client-4.pem"), Cert("client-4.key")), "'client-4' is not on the allow-list"},
      {as(Cert("client-3.pem"), Cert("client-3.key")),
       "'client-3' is an operator (--operators): it may ask for the status, not train"},
      {as(Cert("client-2.pem"), Cert("client-2.key"), {"--status"}),
       "'client-2' may not ask for the run's status: it is not an operator"}};
  for (size_t i = 0; i < refused.size(); ++i) {
    auto [code, log] = client("refused" + std::to_string(i), refused[i].first);
    EXPECT_EQ(code, client::kExitRefused) << i << ": " << log;
    EXPECT_THAT(log, HasSubstr(refused[i].second)) << i;
  }
  auto [status_code, status] =
      client("operator", as(Cert("client-3.pem"), Cert("client-3.key"), {"--status"}));
  EXPECT_EQ(status_code, 0) << status;
  EXPECT_THAT(status, HasSubstr("client-1"));
  auto [code4, log4] = client("plaintext", {"--insecure", "--max-retry-s", "2"});
  EXPECT_EQ(code4, 1) << log4;
  auto [code5, log5] =
      client("wrongbase", as(Cert("client-2.pem"), Cert("client-2.key"), {"--base-seed", "8"}));
  EXPECT_EQ(code5, 1);
  EXPECT_THAT(log5, HasSubstr("hint: wrong base model?"));
  kill(good, SIGTERM);
  EXPECT_EQ(testing::Wait(good, std::chrono::seconds(20)), 0);
  kill(server, SIGTERM);
  testing::Wait(server, std::chrono::seconds(10));
  const std::string server_log = testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(server_log, HasSubstr("refused client-4"));
  EXPECT_THAT(server_log, HasSubstr("refused client-3"));
}

// A second process with client-1's certificate joins while the first runs: the first is told, at
// its next call, that a later join superseded its session, and exits with kExitRefused; the
// coordinator logs a warning naming both peers. (The newer one wins: a client restarted after a
// crash must not wait out its old session's timeout, and a stolen key is the operator's to revoke.)
TEST_F(FederationTest, ASecondProcessWithOneIdentitySupersedesTheFirst) {
  const pid_t server = StartServer("fedit", "state", {"--min-clients", "2"});
  ASSERT_FALSE(port_.empty());
  const pid_t first = StartClient(1, "first");
  for (int t = 0; t < 200 && testing::ReadText(dir_ / "state.log").find("client-1 joined") ==
                                 std::string::npos;
       ++t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const pid_t second = StartClient(1, "second");
  EXPECT_EQ(testing::Wait(first, std::chrono::seconds(30)), client::kExitRefused);
  const std::string first_log = testing::ReadText(dir_ / "first-client1.log");
  EXPECT_THAT(first_log,
              HasSubstr("this session of client-1 was superseded by a later join with the "
                        "same identity from ipv"));
  const std::string server_log = testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(server_log,
              ::testing::ContainsRegex(
                  "client-1: a call from ipv[46]:[^ ]+ in a session that a later join "
                  "from ipv[46]:[^ ]+ superseded: two processes use client-1's certificate"));
  kill(second, SIGTERM);
  EXPECT_EQ(testing::Wait(second, std::chrono::seconds(20)), 0);
  kill(server, SIGTERM);
  testing::Wait(server, std::chrono::seconds(10));
}

}  // namespace
}  // namespace fedlora

namespace fedlora {
namespace {

// A client that speaks the protocol directly, to send what a correct node never would.
class RawClient {
 public:
  RawClient(const std::string& port, const std::string& certs, const std::string& name) {
    auto creds = common::ClientTlsCredentials(certs + "/ca.pem", certs + "/" + name + ".pem",
                                              certs + "/" + name + ".key");
    stub_ = v1::Coordinator::NewStub(grpc::CreateChannel("localhost:" + port, *creds));
  }
  grpc::Status Join(const client::RegressionWorkload& w) {
    v1::JoinRequest request;
    request.set_base_model_sha256(w.fingerprint());
    request.set_max_rank(64);
    request.set_num_examples(w.num_examples());
    for (auto& m : w.modules()) *request.add_modules() = m;
    v1::JoinResponse response;
    grpc::ClientContext context;
    return stub_->Join(&context, request, &response);
  }
  v1::Task Task() {
    v1::GetTaskRequest request;
    request.set_have_version(-1);
    request.set_max_wait_ms(5000);
    v1::Task task;
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->GetTask(&context, request, &task).ok());
    return task;
  }
  // Sends `bytes` as one chunk at `offset`; `sha` and `size` default to those of `bytes`.
  grpc::Status Upload(const v1::Task& task, const std::string& bytes, v1::UploadResponse* response,
                      std::optional<std::string> sha = {}, int64_t round_shift = 0,
                      int64_t version_shift = 0, std::optional<int64_t> size = {},
                      int64_t offset = 0) {
    v1::UploadRequest request;
    request.set_round(task.round() + round_shift);
    request.set_state_version(task.state_version() + version_shift);
    request.set_sha256(sha.value_or(common::Sha256Hex(bytes)));
    request.set_total_size(size.value_or(static_cast<int64_t>(bytes.size())));
    request.set_offset(offset);
    request.set_data(bytes);
    request.set_num_examples(100);
    grpc::ClientContext context;
    return stub_->Upload(&context, request, response);
  }
  // Bytes [offset, offset + length) of the update `whole`, as one chunk of it.
  grpc::Status UploadPart(const v1::Task& task, const std::string& whole, size_t offset,
                          size_t length, v1::UploadResponse* response) {
    return Upload(task, whole.substr(offset, length), response, common::Sha256Hex(whole), 0, 0,
                  static_cast<int64_t>(whole.size()), static_cast<int64_t>(offset));
  }

 private:
  std::unique_ptr<v1::Coordinator::Stub> stub_;
};

// client-1 and client-2, joined with `workload` (a coordinator with --min-clients 2 then opens
// round 1).
std::pair<RawClient, RawClient> JoinTwo(const std::string& port, const fs::path& certs,
                                        const client::RegressionWorkload& workload) {
  std::pair<RawClient, RawClient> clients{RawClient(port, certs.string(), "client-1"),
                                          RawClient(port, certs.string(), "client-2")};
  EXPECT_TRUE(clients.first.Join(workload).ok());
  EXPECT_TRUE(clients.second.Join(workload).ok());
  return clients;
}

common::Adapter Update(const v1::Task& task, int rank, float fill) {
  std::vector<common::ModuleShape> shapes;
  for (const auto& m : task.modules())
    shapes.push_back({m.name(), rank, m.in_features(), m.out_features(),
                      task.settings().lora_alpha() / task.settings().rank(), false});
  common::Adapter a = *common::Adapter::Create(shapes);
  for (float& x : a.values()) x = fill;
  return a;
}

TEST_F(FederationTest, RefusesBadUpdatesPreciselyAndTheRoundGoesOn) {
  const pid_t server = StartServer("fedit", "state", {"--max-update-bytes", "20000"});
  ASSERT_FALSE(port_.empty());
  client::RegressionOptions opts;
  opts.layers = 2;
  opts.in_features = 24;
  opts.out_features = 20;
  const client::RegressionWorkload workload(opts);
  RawClient c1(port_, (dir_ / "certs").string(), "client-1"),
      c2(port_, (dir_ / "certs").string(), "client-2"),
      c3(port_, (dir_ / "certs").string(), "client-3");
  ASSERT_TRUE(c1.Join(workload).ok());
  ASSERT_TRUE(c2.Join(workload).ok());
  ASSERT_TRUE(c3.Join(workload).ok());  // min-clients 3: round 1 starts, cohort of all three
  const v1::Task task = c1.Task();
  ASSERT_EQ(task.kind(), v1::Task::TRAIN);
  v1::UploadResponse r;
  const std::string good = common::EncodeAdapter(Update(task, 4, 0.01f));

  auto expect = [&](grpc::Status s, grpc::StatusCode code, const std::string& message) {
    EXPECT_EQ(s.error_code(), code) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr(message));
  };
  expect(c1.Upload(task, common::EncodeAdapter(Update(task, 8, 0.01f)), &r),
         grpc::StatusCode::INVALID_ARGUMENT,
         "module model.layers.0.self_attn.q_proj: lora_A has shape [8,24], task says [4,24]");
  expect(c1.Upload(task, common::EncodeAdapter(Update(task, 4, NAN)), &r),
         grpc::StatusCode::INVALID_ARGUMENT, "lora_A holds a non-finite value (nan)");
  expect(c1.Upload(task, common::EncodeAdapter(Update(task, 4, INFINITY)), &r),
         grpc::StatusCode::INVALID_ARGUMENT, "non-finite value (inf)");
  expect(c1.Upload(task, good, &r, {}, 0, 0, 1 << 20), grpc::StatusCode::RESOURCE_EXHAUSTED,
         "update of 1048576 bytes exceeds the limit of 20000 bytes");
  expect(c1.Upload(task, good, &r, {}, 1), grpc::StatusCode::FAILED_PRECONDITION,
         "upload for round 2 but round 1 is open");
  expect(c1.Upload(task, good, &r, {}, 0, 1), grpc::StatusCode::FAILED_PRECONDITION,
         "update trained from version 1 but round 1 trains from version 0");
  expect(c1.Upload(task, good, &r, std::string(64, 'a')), grpc::StatusCode::INVALID_ARGUMENT,
         "checksum mismatch: the update's sha256 is");
  expect(c1.Upload(task, "not a safetensors file at all", &r), grpc::StatusCode::INVALID_ARGUMENT,
         "invalid safetensors file");
  // The correct update is accepted; retrying it is accepted again without counting twice; another
  // is refused.
  ASSERT_TRUE(c1.Upload(task, good, &r).ok());
  EXPECT_TRUE(r.accepted());
  ASSERT_TRUE(c1.Upload(task, good, &r).ok());
  EXPECT_TRUE(r.accepted());
  expect(c1.Upload(task, common::EncodeAdapter(Update(task, 4, 0.02f)), &r),
         grpc::StatusCode::ALREADY_EXISTS,
         "an update for round 1 was already accepted from client-1");
  // The round goes on: the others deliver and it closes with all three, counting client-1 once.
  const v1::Task t2 = c2.Task(), t3 = c3.Task();
  ASSERT_TRUE(c2.Upload(t2, common::EncodeAdapter(Update(t2, 4, 0.03f)), &r).ok());
  ASSERT_TRUE(c3.Upload(t3, common::EncodeAdapter(Update(t3, 4, 0.05f)), &r).ok());
  const auto metrics = MetricsOnceThere("state", 1);
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["arrived"].size(), 3u);
  EXPECT_EQ(metrics[0]["rejected"].size(),
            5u);  // the shape, NaN, Inf, checksum and garbage uploads
  kill(server, SIGTERM);
  testing::Wait(server, std::chrono::seconds(10));
  const std::string log = testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(
      log,
      HasSubstr(
          "rejected client-1's update: module model.layers.0.self_attn.q_proj: lora_A has shape"));
}

// An update for a round that has closed is refused as late, named in the next metrics line, and
// not counted; the client takes part in the next round as usual.
TEST_F(FederationTest, LateUpdatesAreRecordedAndNotCounted) {
  const pid_t server = StartServer("fedit", "state",
                                   {"--min-clients", "3", "--rounds", "2", "--quorum", "0.6",
                                    "--round-deadline-s", "1", "--client-timeout-s", "60"});
  ASSERT_FALSE(port_.empty());
  const client::RegressionWorkload workload(client::RegressionOptions{});
  std::vector<std::unique_ptr<RawClient>> clients;
  for (int i = 1; i <= 3; ++i) {
    clients.push_back(std::make_unique<RawClient>(port_, (dir_ / "certs").string(),
                                                  "client-" + std::to_string(i)));
    ASSERT_TRUE(clients.back()->Join(workload).ok());
  }
  std::vector<v1::Task> tasks;
  for (auto& c : clients) tasks.push_back(c->Task());
  v1::UploadResponse r;
  for (int i = 0; i < 2; ++i) {
    ASSERT_TRUE(
        clients[i]->Upload(tasks[i], common::EncodeAdapter(Update(tasks[i], 4, 0.01f)), &r).ok());
  }
  // Round 1 closes at its deadline with 2 of 3; client-3's update comes after.
  for (int t = 0; t < 200 && Metrics("state").empty(); ++t)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  ASSERT_EQ(Metrics("state").size(), 1u);
  const grpc::Status late =
      clients[2]->Upload(tasks[2], common::EncodeAdapter(Update(tasks[2], 4, 0.05f)), &r);
  EXPECT_EQ(late.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(late.error_message(),
              HasSubstr("round 1 closed before this update arrived (late); round 2 is open"));
  // Round 2 with everyone.
  for (auto& c : clients) {
    const v1::Task task = c->Task();
    ASSERT_EQ(task.round(), 2);
    ASSERT_TRUE(c->Upload(task, common::EncodeAdapter(Update(task, 4, 0.02f)), &r).ok());
  }
  const auto metrics = MetricsOnceThere("state", 2);
  ASSERT_EQ(metrics.size(), 2u);
  EXPECT_EQ(metrics[0]["dropped"], nlohmann::json({"client-3"}));
  EXPECT_EQ(metrics[0]["late"], nlohmann::json::object());
  EXPECT_EQ(metrics[1]["late"], nlohmann::json({{"client-3", 1}}));
  EXPECT_EQ(metrics[1]["arrived"].size(), 3u);
  EXPECT_EQ(testing::Wait(server, std::chrono::seconds(20)), 0);
  EXPECT_THAT(testing::ReadText(dir_ / "state.log"),
              HasSubstr("client-3's update for round 1 came after that round closed; not counted "
                        "(late)"));
}

// SIGUSR1 exports the latest version of a run in progress, as the end of the run would; before the
// first round has completed it says there is nothing to export and the coordinator goes on. Then
// `fedlora-client --status` shows an operator the run in progress.
TEST_F(FederationTest, ExportsOnSigusr1AndReportsStatusMidRun) {
  const pid_t server = StartServer("fedit", "state", {"--min-clients", "2", "--rounds", "2"});
  ASSERT_FALSE(port_.empty());
  auto log_has = [&](const std::string& text) {
    for (int t = 0; t < 200; ++t) {
      if (testing::ReadText(dir_ / "state.log").find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return false;
  };
  kill(server, SIGUSR1);
  EXPECT_TRUE(log_has("export on request: no round has completed yet"));

  auto [c1, c2] = JoinTwo(port_, dir_ / "certs", client::RegressionWorkload({}));
  const v1::Task task = c1.Task();
  ASSERT_EQ(task.kind(), v1::Task::TRAIN);
  const common::Adapter u1 = Update(task, 4, 0.01f), u2 = Update(task, 4, 0.03f);
  v1::UploadResponse r;
  ASSERT_TRUE(c1.Upload(task, common::EncodeAdapter(u1), &r).ok());
  ASSERT_TRUE(c2.Upload(c2.Task(), common::EncodeAdapter(u2), &r).ok());
  ASSERT_EQ(MetricsOnceThere("state", 1).size(), 1u);  // round 1 closed; round 2 waits

  kill(server, SIGUSR1);
  ASSERT_TRUE(log_has("exported version 1 of 2 rounds"));
  const auto version =
      nlohmann::json::parse(testing::ReadText(dir_ / "state" / "export" / "version.json"));
  EXPECT_EQ(version["version"], 1);
  EXPECT_EQ(version["rounds"], 2);
  EXPECT_EQ(version["method"], "fedit");
  // Equal example counts: the exported adapter is B̄·Ā of the two uploads' plain means.
  const auto exported = common::ReadPeftAdapter(dir_ / "state" / "export" / "global");
  ASSERT_TRUE(exported.ok()) << exported.status();
  ExpectPlainFedItMean(*exported, u1, u2);

  // An operator asks how the run is going, over the same mutual TLS (any accepted identity may).
  auto status = [&](const std::string& flag) {
    const fs::path out = dir_ / ("status" + flag + ".txt");
    const pid_t pid = testing::Start(
        {kBin + "/fedlora-client", "--coordinator", "localhost:" + port_, "--ca", Cert("ca.pem"),
         "--cert", Cert("client-1.pem"), "--key", Cert("client-1.key"), flag},
        out, dir_ / ("status" + flag + ".err"));  // stdout alone: the JSON
    EXPECT_EQ(testing::Wait(pid, std::chrono::seconds(20)), 0);
    return testing::ReadText(out);
  };
  const auto json = nlohmann::json::parse(status("--status-json"), nullptr, false);
  ASSERT_FALSE(json.is_discarded());
  EXPECT_EQ(json["phase"], "training");
  EXPECT_EQ(json["round"], "2");  // int64 fields are strings in protobuf's JSON mapping
  EXPECT_EQ(json["state_version"], "1");
  EXPECT_EQ(json["cohort"], nlohmann::json({"client-1", "client-2"}));
  EXPECT_EQ(json["arrived"], nlohmann::json::array());
  ASSERT_EQ(json["clients"].size(), 2u);
  EXPECT_EQ(json["clients"][1]["id"], "client-2");
  EXPECT_EQ(json["clients"][1]["rounds_contributed"], "1");
  const std::string text = status("--status");
  EXPECT_THAT(text, HasSubstr("(fedit): training, round 2 of 2, state version 1"));
  EXPECT_THAT(text, HasSubstr("cohort: client-1, client-2\narrived: -"));

  kill(server, SIGTERM);
  EXPECT_EQ(testing::Wait(server, std::chrono::seconds(10)), 3);  // stopped before its last round
}

// A client that retries its last chunk while the coordinator is still checking it (verification
// runs outside the engine's lock) is told to retry, never counted twice, and the round's aggregate
// is the plain FedIT mean of the two updates.
TEST_F(FederationTest, ConcurrentRetriesOfAnUpdateAreAcceptedOnce) {
  const pid_t server =
      StartServer("fedit", "state",
                  {"--min-clients", "2", "--rounds", "1", "--rank", "64", "--chunk-bytes",
                   std::to_string(8 << 20), "--max-update-bytes", std::to_string(16 << 20)});
  ASSERT_FALSE(port_.empty());
  client::RegressionOptions opts;
  opts.layers = 4;
  opts.in_features = 1024;
  opts.out_features = 1024;
  opts.examples = 100;  // what UploadPart claims
  auto [c1, c2] = JoinTwo(port_, dir_ / "certs", client::RegressionWorkload(opts));
  const v1::Task task = c1.Task();
  ASSERT_EQ(task.kind(), v1::Task::TRAIN);
  const common::Adapter u1 = Update(task, 64, 0.01f), u2 = Update(task, 64, 0.03f);
  const std::string bytes = common::EncodeAdapter(u1);  // 2 MB: its checks take a few ms
  // All but its last KiB first; then that KiB from eight threads at once. The first to arrive
  // completes the update, and the others, a KiB each, arrive while its 2 MB are being checked.
  const size_t head = bytes.size() - 1024;
  v1::UploadResponse r;
  ASSERT_TRUE(c1.UploadPart(task, bytes, 0, head, &r).ok());
  ASSERT_EQ(r.received(), static_cast<int64_t>(head));
  std::vector<grpc::Status> statuses(8);
  std::vector<v1::UploadResponse> responses(8);
  std::vector<std::thread> threads;
  for (size_t t = 0; t < statuses.size(); ++t) {
    threads.emplace_back(
        [&, t] { statuses[t] = c1.UploadPart(task, bytes, head, 1024, &responses[t]); });
  }
  for (std::thread& t : threads) t.join();
  int accepted = 0;
  for (size_t t = 0; t < statuses.size(); ++t) {
    if (statuses[t].ok()) {
      EXPECT_TRUE(responses[t].accepted());
      accepted += responses[t].accepted();
    } else {
      EXPECT_EQ(statuses[t].error_code(), grpc::StatusCode::UNAVAILABLE);
      EXPECT_THAT(statuses[t].error_message(),
                  HasSubstr("client-1's update for round 1 is being verified; retry"));
    }
  }
  EXPECT_GE(accepted, 1);
  ASSERT_TRUE(c1.Upload(task, bytes, &r).ok());  // a retry after the checks: accepted again
  EXPECT_TRUE(r.accepted());
  ASSERT_TRUE(c2.Upload(c2.Task(), common::EncodeAdapter(u2), &r).ok());

  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["arrived"].size(), 2u);
  EXPECT_EQ(metrics[0]["rejected"].size(), 0u);
  // Equal example counts: the aggregate is B̄·Ā with plain means. Folding client-1 twice would
  // weigh it 2:1.
  const common::Adapter global =
      *common::DecodeAdapter(Blob("state", metrics[0]["global_blob"]), "global");
  ExpectPlainFedItMean(global, u1, u2);
  kill(server, SIGTERM);
  testing::Wait(server, std::chrono::seconds(10));
  const std::string log = testing::ReadText(dir_ / "state.log");
  size_t acceptances = 0;
  for (size_t at = 0; (at = log.find("accepted client-1's update", at)) != std::string::npos; ++at)
    ++acceptances;
  EXPECT_EQ(acceptances, 1u);
}

}  // namespace
}  // namespace fedlora

namespace fedlora {
namespace {

int FreePort() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

std::vector<float> Tensors(const fs::path& file) {
  std::vector<float> all;
  auto f = common::SafetensorsFile::Open(file);
  EXPECT_TRUE(f.ok()) << f.status();
  if (!f.ok()) return all;
  for (const auto& t : f->view().tensors()) {
    std::vector<float> v(static_cast<size_t>(t.num_elements()));
    f->view().ReadF32(t, v);
    all.insert(all.end(), v.begin(), v.end());
  }
  return all;
}

TEST_F(FederationTest, ClientKilledMidUploadIsDroppedAndCatchesUpAfterRestart) {
  const pid_t server =
      StartServer("flora", "state",
                  {"--quorum", "0.6", "--round-deadline-s", "20", "--client-timeout-s", "1.5",
                   "--rank", "8", "--chunk-bytes", "1024"});
  ASSERT_FALSE(port_.empty());
  const pid_t c1 = StartClient(1, "run"), c2 = StartClient(2, "run");
  // Client 3 dies (exit 9, like kill -9) half-way through its first upload, sent in 1 KiB chunks.
  const pid_t dying =
      StartClient(3, "run", {"--chunk-bytes", "1024", "--testing-die-mid-upload", "0.5"},
                  "fedlora-client-faulty");
  EXPECT_EQ(testing::Wait(dying, std::chrono::seconds(30)), 9);
  // Round 1 closes with the quorum (2 of 3) once client 3 is silent; its partial upload is
  // discarded.
  for (int t = 0; t < 200 && Metrics("state").empty(); ++t)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto first = Metrics("state");
  ASSERT_EQ(first.size(), 1u) << testing::ReadText(dir_ / "state.log");
  EXPECT_EQ(first[0]["arrived"], nlohmann::json({"client-1", "client-2"}));
  EXPECT_EQ(first[0]["dropped"], nlohmann::json({"client-3"}));
  // ... and deleted: nothing of round 1 is left in incoming/.
  for (const auto& entry : fs::directory_iterator(dir_ / "state" / "incoming"))
    EXPECT_THAT(entry.path().filename().string(), Not(HasSubstr("round1-")));
  // Restarted, client 3 re-joins, downloads the deltas it lacks, and ends with everyone's merged
  // base.
  const pid_t back = StartClient(3, "run");
  for (pid_t pid : {c1, c2, back}) EXPECT_EQ(testing::Wait(pid, std::chrono::seconds(60)), 0);
  EXPECT_EQ(testing::Wait(server, std::chrono::seconds(30)), 0);
  const auto b1 = Tensors(dir_ / "run-out1" / "base.safetensors"),
             b3 = Tensors(dir_ / "run-out3" / "base.safetensors");
  ASSERT_EQ(b1.size(), b3.size());
  double diff = 0;
  for (size_t i = 0; i < b1.size(); ++i) diff = std::max(diff, std::abs(double(b1[i]) - b3[i]));
  EXPECT_LT(diff, 1e-6);
  EXPECT_THAT(testing::ReadText(dir_ / "state.log"), HasSubstr("client-3 re-joined"));
}

TEST_F(FederationTest, CoordinatorKilledMidRoundContinuesToTheSameResult) {
  // The same seeded run twice: once uninterrupted, once with kill -9 of the coordinator during
  // round 2 and a restart on its state directory (same address; the clients reconnect, re-join and
  // redo the round).
  std::vector<std::vector<float>> finals;
  for (const std::string run : {"straight", "killed"}) {
    port_ = std::to_string(FreePort());
    auto server_argv = [&] {
      return std::vector<std::string>{"--listen", "127.0.0.1:" + port_, "--rounds",
                                      "8",        "--local-steps",      "400"};
    };
    pid_t server = StartServer("fedit", run, server_argv());
    std::vector<pid_t> clients;
    for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, run));
    if (run == "killed") {
      for (int t = 0; t < 400 && Metrics(run).empty(); ++t)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      ASSERT_LT(Metrics(run).size(), 8u) << "the run ended before the coordinator could be killed";
      kill(server, SIGKILL);
      testing::Wait(server, std::chrono::seconds(5));
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      server = StartServer("fedit", run, server_argv());
      ASSERT_FALSE(port_.empty());
    }
    for (pid_t c : clients) EXPECT_EQ(testing::Wait(c, std::chrono::seconds(90)), 0);
    EXPECT_EQ(testing::Wait(server, std::chrono::seconds(30)), 0)
        << testing::ReadText(dir_ / (run + ".log"));
    EXPECT_EQ(Metrics(run).size(), 8u);
    finals.push_back(Tensors(dir_ / run / "export" / "global" / "adapter_model.safetensors"));
  }
  EXPECT_THAT(testing::ReadText(dir_ / "killed.log"), HasSubstr("continuing run"));
  ASSERT_EQ(finals[0].size(), finals[1].size());
  // Cohorts, task seeds and training are seeded; FedIT's streamed sums follow arrival order, which
  // moves only the last bits of the double sums.
  double diff = 0, scale = 0;
  for (size_t i = 0; i < finals[0].size(); ++i) {
    diff = std::max(diff, std::abs(double(finals[0][i]) - finals[1][i]));
    scale = std::max(scale, std::abs(double(finals[0][i])));
  }
  EXPECT_LE(diff, 1e-6 * scale);
}

}  // namespace
}  // namespace fedlora

namespace fedlora {
namespace {

// A TCP proxy on loopback that forwards to `target_port` and, once, cuts a connection (both
// directions) after `cut_after` bytes went from server to client: a real broken connection, under
// TLS.
class CuttingProxy {
 public:
  CuttingProxy(int target_port, int64_t cut_after)
      : target_port_(target_port), cut_after_(cut_after) {
    listener_ = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(listener_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
    listen(listener_, 16);
    socklen_t len = sizeof addr;
    getsockname(listener_, reinterpret_cast<sockaddr*>(&addr), &len);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Accept(); });
  }
  ~CuttingProxy() {
    stop_ = true;
    shutdown(listener_, SHUT_RDWR);
    close(listener_);
    thread_.join();
    for (auto& t : pumps_) t.join();
  }
  int port() const { return port_; }
  bool cut() const { return cut_done_; }

 private:
  void Accept() {
    while (!stop_) {
      int client = accept(listener_, nullptr, nullptr);
      if (client < 0) return;
      int server = socket(AF_INET, SOCK_STREAM, 0);
      sockaddr_in addr{};
      addr.sin_family = AF_INET;
      addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      addr.sin_port = htons(static_cast<uint16_t>(target_port_));
      if (connect(server, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
        close(client);
        close(server);
        continue;
      }
      pumps_.emplace_back([this, client, server] { Pump(client, server); });
    }
  }
  void Pump(int client, int server) {
    char buf[16384];
    pollfd fds[2] = {{client, POLLIN, 0}, {server, POLLIN, 0}};
    while (!stop_) {
      if (poll(fds, 2, 100) <= 0) continue;
      for (int i = 0; i < 2; ++i) {
        if (!(fds[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        const ssize_t n = read(fds[i].fd, buf, sizeof buf);
        if (n <= 0) goto done;
        ssize_t send = n;
        bool cut_here = false;
        if (i == 1 && !cut_done_ && from_server_ + n > cut_after_ && !cut_done_.exchange(true)) {
          send = cut_after_ -
                 from_server_;  // forward up to the threshold exactly: the cut lands mid-message
          cut_here = true;
        }
        if (i == 1) from_server_ += send;
        if (send > 0 && write(fds[1 - i].fd, buf, static_cast<size_t>(send)) != send) goto done;
        if (cut_here) goto done;
      }
    }
  done:
    shutdown(client, SHUT_RDWR);
    shutdown(server, SHUT_RDWR);
    close(client);
    close(server);
  }

  int target_port_;
  int64_t cut_after_;
  int listener_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false}, cut_done_{false};
  std::atomic<int64_t> from_server_{0};
  std::thread thread_;
  std::vector<std::thread> pumps_;
};

// The coordinator's state directory on a small tmpfs (root mounts one) that fills up mid-run: the
// operator reads in the log what is wrong and what to do, the clients wait instead of failing, and
// once space is back the run finishes with the same result as a run on an ample disk.
TEST_F(FederationTest, StateDirectoryOnAFullDiskFinishesWithTheSameResultOnceSpaceIsBack) {
  if (::geteuid() != 0) GTEST_SKIP() << "mounting a tmpfs needs root";
  const fs::path disk = dir_ / "disk";
  fs::create_directories(disk);
  if (std::system(("mount -t tmpfs -o size=8m tmpfs " + disk.string() + " 2>/dev/null").c_str()))
    GTEST_SKIP() << "cannot mount a tmpfs here";
  struct Unmount {
    fs::path path;
    ~Unmount() { std::system(("umount -l " + path.string()).c_str()); }
  } unmount{disk};
  std::vector<std::vector<float>> finals;
  for (const std::string run : {"ample", "full"}) {
    const fs::path state = run == "full" ? disk / "state" : dir_ / run;
    pid_t server = StartServer("fedit", run,
                               {"--state-dir", state.string(), "--rounds", "4", "--local-steps",
                                "400", "--give-up-after-s", "120"});
    ASSERT_FALSE(port_.empty()) << testing::ReadText(dir_ / (run + ".log"));
    std::vector<pid_t> clients;
    for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, run));
    if (run == "full") {
      const fs::path metrics = state / "metrics.jsonl";
      for (int t = 0; t < 3000 && !fs::exists(metrics); ++t)
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
      ASSERT_TRUE(fs::exists(metrics)) << testing::ReadText(dir_ / "full.log");
      // Fill the disk but for room for the next round's three updates and one page more: the
      // uploads fit, and the round's commit (its blob, the ledger) runs out of space.
      const int64_t update = Metrics("disk/state")[0]["blob_bytes"].get<int64_t>();
      const int64_t page = 4096, pages = (update + page - 1) / page;
      struct statvfs fs_stat;
      ASSERT_EQ(statvfs(disk.c_str(), &fs_stat), 0);
      const int64_t free_pages =
          static_cast<int64_t>(fs_stat.f_bavail) * static_cast<int64_t>(fs_stat.f_frsize) / page;
      std::system(fmt::format("dd if=/dev/zero of={} bs={} count={} 2>/dev/null",
                              (disk / "filler").string(), page, free_pages - 3 * pages - 1)
                      .c_str());
      std::string log;
      for (int t = 0; t < 600 && log.find("No space left on device") == std::string::npos; ++t) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        log = testing::ReadText(dir_ / "full.log");
      }
      EXPECT_THAT(log, HasSubstr("No space left on device"));
      EXPECT_THAT(log, HasSubstr("is full: free space there; nothing is lost meanwhile"));
      std::this_thread::sleep_for(std::chrono::seconds(2));  // a few retries on the full disk
      for (pid_t c : clients) EXPECT_EQ(kill(c, 0), 0) << "a client gave up on a full disk";
      fs::remove(disk / "filler");
    }
    for (pid_t c : clients) EXPECT_EQ(testing::Wait(c, std::chrono::seconds(120)), 0);
    EXPECT_EQ(testing::Wait(server, std::chrono::seconds(60)), 0)
        << testing::ReadText(dir_ / (run + ".log"));
    if (run == "full") {  // what the operator saw
      std::stringstream log(testing::ReadText(dir_ / "full.log"));
      for (std::string line; std::getline(log, line);) {
        if (line.find("space") != std::string::npos ||
            line.find("committed after") != std::string::npos)
          std::printf("  %s\n", line.c_str());
      }
    }
    const auto ledger = nlohmann::json::parse(testing::ReadText(state / "ledger.json"));
    std::vector<int64_t> versions;
    for (const auto& v : ledger["versions"]) versions.push_back(v["version"].get<int64_t>());
    EXPECT_EQ(versions, std::vector<int64_t>({0, 1, 2, 3, 4})) << run;
    std::stringstream lines(testing::ReadText(state / "metrics.jsonl"));
    int64_t expected_version = 1;
    for (std::string line; std::getline(lines, line); ++expected_version)
      EXPECT_EQ(nlohmann::json::parse(line)["version"], expected_version) << run;
    EXPECT_EQ(expected_version, 5) << run;
    finals.push_back(Tensors(state / "export" / "global" / "adapter_model.safetensors"));
  }
  ASSERT_EQ(finals[0].size(), finals[1].size());
  double diff = 0, scale = 0;  // as in CoordinatorKilledMidRound: arrival order moves last bits
  for (size_t i = 0; i < finals[0].size(); ++i) {
    diff = std::max(diff, std::abs(double(finals[0][i]) - finals[1][i]));
    scale = std::max(scale, std::abs(double(finals[0][i])));
  }
  EXPECT_LE(diff, 1e-6 * scale);
}

TEST_F(FederationTest, DownloadBrokenMidwayResumesFromItsOffset) {
  // FLoRA deltas of 4 layers × 64×64 at rank 3·8 are ~50 KB, served in 1 KiB chunks; the proxy cuts
  // client 1's connection once 20 KB went its way, which is inside its first delta download.
  const pid_t server = StartServer("flora", "state", {"--rank", "8", "--chunk-bytes", "1024"});
  ASSERT_FALSE(port_.empty());
  CuttingProxy proxy(std::stoi(port_), 20000);
  const std::vector<std::string> shape = {"--layers",       "4",  "--in-features", "64",
                                          "--out-features", "64", "--chunk-bytes", "1024"};
  const std::string direct = port_;
  port_ = std::to_string(proxy.port());
  const pid_t c1 = StartClient(1, "run", shape);
  port_ = direct;
  const pid_t c2 = StartClient(2, "run", shape), c3 = StartClient(3, "run", shape);
  for (pid_t c : {c1, c2, c3}) EXPECT_EQ(testing::Wait(c, std::chrono::seconds(90)), 0);
  EXPECT_EQ(testing::Wait(server, std::chrono::seconds(30)), 0);
  EXPECT_TRUE(proxy.cut());
  const std::string log = testing::ReadText(dir_ / "run-client1.log");
  EXPECT_THAT(log,
              ::testing::ContainsRegex("resuming download of [0-9a-f]+ at offset [1-9][0-9]* of"));
  EXPECT_EQ(Tensors(dir_ / "run-out1" / "base.safetensors"),
            Tensors(dir_ / "run-out2" / "base.safetensors"));
}

}  // namespace
}  // namespace fedlora

namespace fedlora {
namespace {

TEST_F(FederationTest, CommandWorkloadRunsTheSitesOwnTrainer) {
  // The site's "trainer" hands back its start adapter: FedIT's next global must then be the initial
  // one. Client i reports a loss before training of i on 10·i examples this round.
  auto trainer = [](int i) {
    return R"(cp "$FEDLORA_START_DIR"/* "$FEDLORA_OUT_DIR"/ && grep -q '"method": "fedit"' )"
           R"("$FEDLORA_TASK_JSON" && echo '{"loss_before": )" +
           std::to_string(i) + R"(, "loss_after": 0.5, "num_examples": )" + std::to_string(10 * i) +
           R"(}' > "$FEDLORA_OUT_DIR/metrics.json")";
  };
  RunFederation("fedit", {"--rounds", "1"}, [&](int i) {
    return std::vector<std::string>{
        "--workload",          "command",
        "--train-command",     trainer(i),
        "--base-model-sha256", std::string(64, 'c'),
        "--modules",           "m.q_proj:24:20,m.v_proj:24:8",
        "--work-dir",          (dir_ / ("work" + std::to_string(i))).string()};
  });
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["arrived"].size(), 3u);
  EXPECT_DOUBLE_EQ(metrics[0]["mean_train_loss"].get<double>(), 0.5);
  // The counts the program reported are the round's weights: (10·1 + 20·2 + 30·3) / 60.
  EXPECT_EQ(metrics[0]["examples"],
            nlohmann::json({{"client-1", 10}, {"client-2", 20}, {"client-3", 30}}));
  EXPECT_NEAR(metrics[0]["mean_loss_before"].get<double>(), 140.0 / 60.0, 1e-12);
  const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "state" / "ledger.json"));
  const auto v0 =
      common::DecodeAdapter(Blob("state", ledger["versions"][0]["blobs"][0]["sha256"]), "v0");
  const auto v1 = common::DecodeAdapter(Blob("state", metrics[0]["global_blob"]), "v1");
  ASSERT_TRUE(v0.ok() && v1.ok());
  ASSERT_EQ(v0->num_modules(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_LT(testing::RelativeDiff(v1->A(i).cast<double>(), v0->A(i).cast<double>()), 1e-6);
    EXPECT_EQ(v1->B(i).norm(), 0.0f);
  }
}

// The llm workload end to end: a tiny Llama made by `fedlora init-model`, a non-IID synthetic
// instruction dataset from `fedlora make-data`, 3 clients fine-tuning over mutual TLS, and the
// coordinator evaluating the global model on held-out data every round.
class LlmFixture : public FederationTest {
 protected:
  // Runs the offline tool; returns its last JSON line (null when it prints none).
  nlohmann::json Fedlora(const std::string& args) {
    const fs::path log = dir_ / "fedlora.log";
    const std::string cmd = kBin + "/fedlora " + args + " > " + log.string() + " 2>&1";
    EXPECT_EQ(std::system(cmd.c_str()), 0) << cmd << "\n" << testing::ReadText(log);
    return testing::LastJsonLine(testing::ReadText(log));
  }
  double EvalLoss(const fs::path& model) {
    return Fedlora("eval --model " + model.string() + " --data " +
                   (dir_ / "data" / "test.jsonl").string() + " --json")["loss"];
  }
  void FineTune(const std::string& method, const std::string& preset, const std::string& targets);
};

// A federation of `llm` clients fine-tuning a tiny model of `preset`'s architecture with `method`:
// held-out loss falls, and the exported merged model, evaluated by another process, has the loss
// the coordinator measured on the base with the global adapter.
void LlmFixture::FineTune(const std::string& method, const std::string& preset,
                          const std::string& targets) {
  const fs::path data = dir_ / "data", model = dir_ / "model";
  Fedlora("make-data --out " + data.string() +
          " --clients 3 --records 48 --test-records 24 --alpha 0.5 --seed 1");
  Fedlora("init-model --preset " + preset + " --seed 2 --init-std 0.1 --merges 60 " +
          "--tokenizer-corpus " + (data / "client-1.jsonl").string() + " --out " + model.string());
  const double base_loss = EvalLoss(model);

  RunFederation(
      method,
      {"--rounds", "2", "--base-model-dir", model.string(), "--export-gguf", "f32", "--eval-data",
       (data / "test.jsonl").string(), "--eval-accuracy", "--eval-max-new-tokens", "8",
       "--target-modules", targets, "--local-steps", "6",
       // Fed-SB trains only R (r² values per module) in a random subspace: it wants a larger step.
       "--learning-rate", method == "fed-sb" ? "0.1" : "0.01"},
      [&](int i) {
        return std::vector<std::string>{
            "--workload",      "llm",
            "--model",         model.string(),
            "--data",          (data / ("client-" + std::to_string(i) + ".jsonl")).string(),
            "--batch",         "8",
            "--eval-examples", "16"};
      });

  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 2u);
  for (const auto& m : metrics) ASSERT_TRUE(m.contains("eval_loss")) << m.dump();
  const double final_loss = metrics.back()["eval_loss"];
  EXPECT_LT(final_loss, 0.9 * base_loss) << "base " << base_loss;
  EXPECT_LT(metrics[1]["eval_loss"].get<double>(), metrics[0]["eval_loss"].get<double>());
  const fs::path exported = dir_ / "state" / "export";
  EXPECT_NEAR(EvalLoss(exported / "merged"), final_loss, 1e-5 * final_loss);
  // The accuracy of greedy answers, as `fedlora eval --accuracy` finds it on the merged export.
  // The merged weights' logits differ from base + adapter in the last bits, which could flip one
  // near-tied argmax: one record of the 24 is the tolerance.
  const auto scored =
      Fedlora("eval --accuracy --max-new-tokens 8 --model " + (exported / "merged").string() +
              " --data " + (data / "test.jsonl").string() + " --json");
  ASSERT_EQ(scored["answered"], 24);
  for (const auto& m : metrics) {
    ASSERT_TRUE(m.contains("eval_accuracy")) << m.dump();
    const double a = m["eval_accuracy"];
    EXPECT_EQ(a * 24, std::round(a * 24)) << "not a count of 24 records: " << a;
    // Per category: six of 4 records each, whose mean is the whole set's accuracy.
    ASSERT_EQ(m["eval_accuracy_by_task"].size(), 6u) << m.dump();
    double mean = 0;
    for (const auto& [task, by_task] : m["eval_accuracy_by_task"].items())
      mean += by_task.get<double>() / 6;
    EXPECT_NEAR(mean, a, 1e-12);
  }
  EXPECT_NEAR(scored["accuracy"].get<double>(), metrics.back()["eval_accuracy"].get<double>(),
              1.0 / 24 + 1e-12);
  if (method == "flora") {  // each client holds the same merged base
    EXPECT_NEAR(EvalLoss(dir_ / "run-out1" / "model"), final_loss, 1e-5 * final_loss);
  }
  // The coordinator's GGUF files are what `fedlora export-gguf` makes of its global adapter (the
  // files themselves are checked in llama.cpp by e2e.GgufExportsMatchLlamaCpp). FLoRA's merged
  // weights add each round's delta in turn, so they differ from a merge of the stacked adapter in
  // the last bits: its model file is left out.
  const std::string global = (exported / "global").string();
  Fedlora("export-gguf --lora --model " + model.string() + " --adapter " + global + " --out " +
          (dir_ / "adapter.gguf").string());
  EXPECT_EQ(testing::ReadText(exported / "gguf" / "adapter.gguf"),
            testing::ReadText(dir_ / "adapter.gguf"));
  if (method != "flora") {
    Fedlora("export-gguf --dtype f32 --model " + model.string() + " --adapter " + global +
            " --out " + (dir_ / "model.gguf").string());
    EXPECT_EQ(testing::ReadText(exported / "gguf" / "model.gguf"),
              testing::ReadText(dir_ / "model.gguf"));
  }
}

// Held-out records whose responses all fall past --eval-max-length would give a held-out loss of
// nothing, reported as 0: the coordinator refuses to start instead, saying what to raise.
TEST_F(LlmFixture, HeldOutDataWithNoTargetWithinTheLengthIsRefusedAtStart) {
  const fs::path data = dir_ / "data", model = dir_ / "model";
  Fedlora("make-data --out " + data.string() + " --clients 1 --records 8 --test-records 6");
  Fedlora("init-model --preset tiny --out " + model.string());
  const pid_t pid = Track(
      testing::Start({kBin + "/fedlora-server", "--method", "fedit", "--insecure", "--state-dir",
                      (dir_ / "state").string(), "--base-model-dir", model.string(), "--eval-data",
                      (data / "test.jsonl").string(), "--eval-max-length", "16"},
                     dir_ / "server.log"));
  EXPECT_NE(testing::Wait(pid, std::chrono::seconds(20)), 0);
  EXPECT_THAT(testing::ReadText(dir_ / "server.log"),
              HasSubstr("no record keeps a target token within 16 tokens; raise eval_max_length"));
}

class LlmFederation : public LlmFixture, public ::testing::WithParamInterface<std::string> {};

TEST_P(LlmFederation, ClientsFineTuneATinyModelAndHeldOutLossFalls) {
  FineTune(GetParam(), "tiny", "q_proj,v_proj,up_proj,down_proj");
}

INSTANTIATE_TEST_SUITE_P(Methods, LlmFederation,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::erase(name, '-');
                           return name;
                         });

// The same on each family's tiny preset: Llama 3.2's rope scaling, Qwen2's biases, Qwen3's q/k
// norms, Mistral's sliding window (32 positions, shorter than the records), each with another
// method and set of LoRA targets.
struct FamilyRun {
  const char* preset;
  const char* method;
  const char* targets;
};

class FamilyFederation : public LlmFixture, public ::testing::WithParamInterface<FamilyRun> {};

TEST_P(FamilyFederation, ClientsFineTuneAndTheMergedExportEvaluatesAsTheCoordinatorSaid) {
  FineTune(GetParam().method, GetParam().preset, GetParam().targets);
}

INSTANTIATE_TEST_SUITE_P(
    Presets, FamilyFederation,
    ::testing::Values(FamilyRun{"tiny-llama3", "fed-sb", "q_proj,k_proj,v_proj,o_proj"},
                      FamilyRun{"tiny-qwen2", "fedit",
                                "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
                      FamilyRun{"tiny-qwen3", "lora-fair", "q_proj,k_proj,v_proj,down_proj"},
                      FamilyRun{"tiny-mistral", "flora", "q_proj,v_proj,gate_proj"}),
    [](const auto& info) {
      std::string name = info.param.preset;
      std::erase(name, '-');
      return name;
    });

// DP-SGD on the clients: each reports the ε its ledger has spent, the coordinator records it per
// round, and a client whose next round would pass its target declines it and leaves.
TEST_F(LlmFixture, DpSgdClientsReportEpsilonAndStopAtTheirTarget) {
  const fs::path data = dir_ / "data", model = dir_ / "model";
  Fedlora("make-data --out " + data.string() +
          " --clients 3 --records 48 --test-records 12 --alpha 0.5 --seed 1");
  Fedlora("init-model --preset tiny --seed 2 --init-std 0.1 --out " + model.string());
  const double q = 8.0 / 48, sigma = 1.0, delta = 1e-5;
  const double eps1 = common::EpsilonFor(q, sigma, 6, delta)->epsilon;
  const double eps2 = common::EpsilonFor(q, sigma, 12, delta)->epsilon;
  // Client 3 has room for one round, not two: it declines round 2 and leaves (exit 0: a spent
  // budget is not a failure), and the round closes with the other two at once, not at a deadline.
  RunFederation(
      "fedit",
      {"--rounds", "2", "--local-steps", "6", "--learning-rate", "0.01", "--target-modules",
       "q_proj,v_proj"},
      [&](int i) {
        std::vector<std::string> flags = {
            "--workload",
            "llm",
            "--model",
            model.string(),
            "--data",
            (data / ("client-" + std::to_string(i) + ".jsonl")).string(),
            "--batch",
            "8",
            "--eval-examples",
            "8",
            "--dp-noise-multiplier",
            "1",
            "--dp-clip",
            "1"};
        if (i == 3)
          flags.insert(flags.end(), {"--target-epsilon", std::to_string((eps1 + eps2) / 2)});
        return flags;
      });

  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 2u);
  ASSERT_EQ(metrics[0]["dp_epsilon"].size(), 3u) << metrics[0].dump();
  for (const auto& [id, eps] : metrics[0]["dp_epsilon"].items())
    EXPECT_NEAR(eps.get<double>(), eps1, 1e-9 * eps1) << id;
  EXPECT_EQ(metrics[1]["arrived"].size(), 2u);
  EXPECT_EQ(metrics[1]["dropped"].size(), 0u);
  EXPECT_EQ(metrics[1]["attempt"], 1);
  EXPECT_THAT(metrics[1]["declined"]["client-3"].get<std::string>(),
              HasSubstr("privacy budget: round 2 would bring epsilon to"));
  ASSERT_EQ(metrics[1]["dp_epsilon"].size(), 2u) << metrics[1].dump();
  for (const auto& [id, eps] : metrics[1]["dp_epsilon"].items())
    EXPECT_NEAR(eps.get<double>(), eps2, 1e-9 * eps2) << id;
  EXPECT_THAT(testing::ReadText(dir_ / "run-client3.log"),
              HasSubstr("privacy budget: round 2 would bring epsilon to"));
  const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "run-ledger3.json"));
  EXPECT_EQ(ledger["rounds"].size(), 1u);
}

}  // namespace
}  // namespace fedlora
