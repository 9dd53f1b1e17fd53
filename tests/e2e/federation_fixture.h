// The fixture of the end-to-end federations (tests/e2e/federation_*_test.cc): real processes —
// fedlora-server and fedlora-client — over real sockets with mutual TLS and certificates made by
// deploy/make_certs.sh, each test in a scratch directory of its own.
#ifndef FEDLORA_TESTS_E2E_FEDERATION_FIXTURE_H_
#define FEDLORA_TESTS_E2E_FEDERATION_FIXTURE_H_

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

namespace fedlora::testing {

namespace fs = std::filesystem;
using ::testing::HasSubstr;
using ::testing::Not;

inline const std::string kBin = FEDLORA_BIN_DIR;
inline const std::string kSource = FEDLORA_SOURCE_DIR;

// argv of `program` with `defaults` ("--flag", value) overridden or extended by `extra` ("--flag",
// "value" pairs, or a lone "--flag"): CLI11 refuses a repeated single-value flag.
inline std::vector<std::string> WithFlags(const std::string& program,
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
    const CommandResult certs =
        RunProgram({"bash", kSource + "/deploy/make_certs.sh", (dir_ / "certs").string(), "4"});
    ASSERT_EQ(certs.exit_code, 0) << certs.output;
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
    const pid_t pid = Track(Start(argv, dir_ / (state + ".log")));
    port_ = WaitForFile(dir_ / (state + ".port"), std::chrono::seconds(10));
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
    return Track(Start(argv, dir_ / (tag + "-client" + std::to_string(i) + ".log")));
  }
  std::vector<nlohmann::json> Metrics(const std::string& state) const {
    std::vector<nlohmann::json> lines;
    std::stringstream in(ReadText(dir_ / state / "metrics.jsonl"));
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
  // A coordinator for `method` (state directory `state`) and clients 1–3 (`tag`, each with
  // client_flags(i)), until all of them exit; every one must exit 0.
  using ClientFlags = std::function<std::vector<std::string>(int)>;
  void RunFederation(const std::string& method, std::vector<std::string> server_flags,
                     const ClientFlags& client_flags = nullptr, const std::string& state = "state",
                     const std::string& tag = "run") {
    const pid_t server = StartServer(method, state, std::move(server_flags));
    ASSERT_FALSE(port_.empty()) << ReadText(dir_ / (state + ".log"));
    std::vector<pid_t> clients;
    for (int i = 1; i <= 3; ++i)
      clients.push_back(
          StartClient(i, tag, client_flags ? client_flags(i) : std::vector<std::string>{}));
    for (int i = 0; i < 3; ++i) {
      EXPECT_EQ(Wait(clients[i], std::chrono::seconds(120)), 0)
          << ReadText(dir_ / (tag + "-client" + std::to_string(i + 1) + ".log"));
    }
    ASSERT_EQ(Wait(server, std::chrono::seconds(60)), 0) << ReadText(dir_ / (state + ".log"));
  }
  std::string Blob(const std::string& state, const std::string& sha) const {
    return ReadText(dir_ / state / "blobs" / sha);
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

  ScratchDir dir_;
  std::string port_;
  std::vector<pid_t> started_;
};

// A port nobody listens on now.
inline int FreePort() {
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

// Every tensor of a safetensors file, as float32, in file order.
inline std::vector<float> Tensors(const fs::path& file) {
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

// The llm workload end to end: a tiny Llama made by `fedlora init-model`, a non-IID synthetic
// instruction dataset from `fedlora make-data`, 3 clients fine-tuning over mutual TLS, and the
// coordinator evaluating the global model on held-out data every round.
class LlmFixture : public FederationTest {
 protected:
  // Runs the offline tool; returns its last JSON line (null when it prints none).
  nlohmann::json Fedlora(const Args& args) {
    const CommandResult r = RunProgram(Argv(kBin + "/fedlora", args));
    EXPECT_EQ(r.exit_code, 0) << CommandLine(args) << "\n" << r.output;
    return LastJsonLine(r.output);
  }
  double EvalLoss(const fs::path& model) {
    return Fedlora({"eval", "--model", model.string(), "--data",
                    (dir_ / "data" / "test.jsonl").string(), "--json"})["loss"];
  }
  // `dtype`: the base checkpoint's (init-model --dtype).
  void FineTune(const std::string& method, const std::string& preset, const std::string& targets,
                const std::string& dtype = "f32");
};

}  // namespace fedlora::testing

#endif  // FEDLORA_TESTS_E2E_FEDERATION_FIXTURE_H_
