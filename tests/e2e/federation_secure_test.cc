// Secure aggregation end to end (README "Secure aggregation"): real fedlora-server and
// fedlora-client processes over mutual TLS, the coordinator seeing only masked inputs and their
// sum.
#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

double Distance(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double s = 0;
  for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) s += std::pow(a[i] - b[i], 2);
  return std::sqrt(s);
}

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
  refused({"--method", "lora-fair", "--client-ca", Cert("ca.pem")},
          "its correction needs a second secure sum");
  refused({"--method", "fedit", "--client-ca", Cert("ca.pem"), "--max-update-norm-ratio", "5"},
          "max_update_norm_ratio cannot be applied under secure aggregation");
  refused(
      {"--method", "fedit", "--client-ca", Cert("ca.pem"), "--dp-clip", "1", "--dp-adaptive-clip"},
      "dp_adaptive_clip needs each client's clipping bit");
}

}  // namespace
}  // namespace fedlora
