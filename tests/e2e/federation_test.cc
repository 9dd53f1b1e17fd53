// Federations of real processes — fedlora-server and fedlora-client — over real sockets with mutual
// TLS and certificates made by deploy/make_certs.sh. Each round's aggregate is recomputed here,
// with dense products, from the client updates the coordinator stored (named in its metrics), and
// compared with the version it published.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "common/blob.h"
#include "common/file_util.h"
#include "common/safetensors.h"
#include "tests/process.h"
#include "tests/test_util.h"

namespace fedlora {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using testing::MatrixD;

const std::string kBin = FEDLORA_BIN_DIR;
const std::string kSource = FEDLORA_SOURCE_DIR;

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
    std::vector<std::string> argv = {kBin + "/fedlora-server",
                                     "--method",
                                     method,
                                     "--rounds",
                                     "3",
                                     "--min-clients",
                                     "3",
                                     "--state-dir",
                                     (dir_ / state).string(),
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--port-file",
                                     (dir_ / (state + ".port")).string(),
                                     "--tls-cert",
                                     Cert("server.pem"),
                                     "--tls-key",
                                     Cert("server.key"),
                                     "--client-ca",
                                     Cert("ca.pem"),
                                     "--linger-s",
                                     "1",
                                     "--rank",
                                     "4",
                                     "--lora-alpha",
                                     "8",
                                     "--local-steps",
                                     "20",
                                     "--learning-rate",
                                     "0.1",
                                     "--seed",
                                     "11"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    fs::remove(dir_ / (state + ".port"));
    const pid_t pid = testing::Start(argv, dir_ / (state + ".log"));
    port_ = testing::WaitForFile(dir_ / (state + ".port"), std::chrono::seconds(10));
    while (!port_.empty() && port_.back() == '\n') port_.pop_back();
    return pid;
  }
  pid_t StartClient(int i, const std::string& tag, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {kBin + "/fedlora-client",
                                     "--coordinator",
                                     "localhost:" + port_,
                                     "--ca",
                                     Cert("ca.pem"),
                                     "--cert",
                                     Cert("client-" + std::to_string(i) + ".pem"),
                                     "--key",
                                     Cert("client-" + std::to_string(i) + ".key"),
                                     "--data-seed",
                                     std::to_string(i),
                                     "--examples",
                                     std::to_string(100 * i + 50),
                                     "--layers",
                                     "2",
                                     "--in-features",
                                     "24",
                                     "--out-features",
                                     "20",
                                     "--out-dir",
                                     (dir_ / (tag + "-out" + std::to_string(i))).string()};
    argv.insert(argv.end(), extra.begin(), extra.end());
    return testing::Start(argv, dir_ / (tag + "-client" + std::to_string(i) + ".log"));
  }
  std::vector<nlohmann::json> Metrics(const std::string& state) const {
    std::vector<nlohmann::json> lines;
    std::stringstream in(testing::ReadText(dir_ / state / "metrics.jsonl"));
    for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
    return lines;
  }
  std::string Blob(const std::string& state, const std::string& sha) const {
    return testing::ReadText(dir_ / state / "blobs" / sha);
  }

  testing::ScratchDir dir_;
  std::string port_;
};

// Runs a whole federation of 3 clients × 3 rounds and checks every round's aggregate against its
// formula.
class EveryMethod : public FederationTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(EveryMethod, AggregatesAreTheFormulaOfWhatClientsUploaded) {
  const std::string method = GetParam();
  const pid_t server = StartServer(method, "state");
  ASSERT_FALSE(port_.empty()) << testing::ReadText(dir_ / "state.log");
  std::vector<pid_t> clients;
  for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, "run"));
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(testing::Wait(clients[i], std::chrono::seconds(60)), 0)
        << testing::ReadText(dir_ / ("run-client" + std::to_string(i + 1) + ".log"));
  }
  ASSERT_EQ(testing::Wait(server, std::chrono::seconds(30)), 0)
      << testing::ReadText(dir_ / "state.log");

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
}

INSTANTIATE_TEST_SUITE_P(Methods, EveryMethod,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

TEST_F(FederationTest, FloraClientsEndWithTheSameMergedBase) {
  const pid_t server = StartServer("flora", "state");
  std::vector<pid_t> clients;
  for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, "run"));
  for (pid_t c : clients) EXPECT_EQ(testing::Wait(c, std::chrono::seconds(60)), 0);
  ASSERT_EQ(testing::Wait(server, std::chrono::seconds(30)), 0);
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

TEST_F(FederationTest, RefusesWhoShouldNotBeLetIn) {
  const pid_t server =
      StartServer("fedit", "state", {"--allowed-clients", "client-1,client-2,client-3"});
  ASSERT_FALSE(port_.empty());
  // Another CA's certificate.
  ASSERT_EQ(std::system(("bash " + kSource + "/deploy/make_certs.sh " + (dir_ / "other").string() +
                         " 1 > /dev/null")
                            .c_str()),
            0);
  const std::string other = (dir_ / "other").string();
  auto client = [&](const std::string& tag, std::vector<std::string> args) {
    std::vector<std::string> argv = {kBin + "/fedlora-client", "--coordinator",
                                     "localhost:" + port_, "--max-retry-s", "2"};
    argv.insert(argv.end(), args.begin(), args.end());
    const pid_t pid = testing::Start(argv, dir_ / (tag + ".log"));
    const int code = testing::Wait(pid, std::chrono::seconds(30));
    return std::make_pair(code, testing::ReadText(dir_ / (tag + ".log")));
  };
  // A good client joins first and pins the run's base model.
  const pid_t good = StartClient(1, "good");
  for (int t = 0; t < 200 && testing::ReadText(dir_ / "state.log").find("client-1 joined") ==
                                 std::string::npos;
       ++t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  auto [code1, log1] = client("nocert", {"--ca", Cert("ca.pem")});
  EXPECT_NE(code1, 0) << log1;
  auto [code2, log2] = client("otherca", {"--ca", Cert("ca.pem"), "--cert", other + "/client-1.pem",
                                          "--key", other + "/client-1.key"});
  EXPECT_NE(code2, 0) << log2;
  auto [code3, log3] = client("notallowed", {"--ca", Cert("ca.pem"), "--cert", Cert("client-4.pem"),
                                             "--key", Cert("client-4.key")});
  EXPECT_NE(code3, 0);
  EXPECT_THAT(log3, HasSubstr("'client-4' is not on the allow-list"));
  auto [code4, log4] = client("plaintext", {"--insecure"});
  EXPECT_NE(code4, 0) << log4;
  auto [code5, log5] = client("wrongbase", {"--ca", Cert("ca.pem"), "--cert", Cert("client-2.pem"),
                                            "--key", Cert("client-2.key"), "--base-seed", "8"});
  EXPECT_NE(code5, 0);
  EXPECT_THAT(log5, HasSubstr("hint: wrong base model?"));
  kill(good, SIGTERM);
  EXPECT_EQ(testing::Wait(good, std::chrono::seconds(20)), 0);
  kill(server, SIGTERM);
  testing::Wait(server, std::chrono::seconds(10));
  const std::string server_log = testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(server_log, HasSubstr("refused client-4"));
}

}  // namespace
}  // namespace fedlora
