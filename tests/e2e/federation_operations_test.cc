// Operating a running federation as the README's "Operating a coordinator" section does it:
// sites enrolled with `fedlora certs` (no key leaves its directory), then an operator's actions
// (pause, resume, remove, export, unpin) with `fedlora-client --admin`, a revocation read on
// SIGHUP, and a reissued certificate that --pin-client-certs holds back until it is unpinned.
#include "tests/e2e/federation_fixture.h"
// clang-format off
#include <httplib.h>  // after the fixture: its <resolv.h> macros break Eigen's templates
// clang-format on

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

class OperationsTest : public FederationTest {
 protected:
  CommandResult Fedlora(Args args) {
    args.insert(args.begin(), kBin + "/fedlora");
    CommandResult r = RunProgram(args);
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r;
  }
  // A site's key and request made in dir_/<dir>, signed by the operator's CA.
  void Enrol(const std::string& cn, const std::string& dir, Args flags = {}) {
    Fedlora({"certs", "request", "--cn", cn, "--out", (dir_ / dir).string()});
    Args sign = {"certs",    "sign",
                 "--ca",     Ca(""),
                 "--csr",    (dir_ / dir / (cn + ".csr")).string(),
                 "--out",    (dir_ / dir / (cn + ".pem")).string(),
                 "--config", Config()};
    sign.insert(sign.end(), flags.begin(), flags.end());
    Fedlora(sign);
  }
  std::string Ca(const std::string& file) const { return (dir_ / "ca" / file).string(); }
  std::string Config() const { return (dir_ / "server.toml").string(); }
  Args Identity(const std::string& cn, const std::string& dir) const {
    return {"--ca",   Ca("ca.pem"),
            "--cert", (dir_ / dir / (cn + ".pem")).string(),
            "--key",  (dir_ / dir / (cn + ".key")).string()};
  }
  // fedlora-client --admin ACTION as `cn`.
  CommandResult Admin(const std::string& cn, Args action) {
    Args args = {kBin + "/fedlora-client", "--coordinator", "localhost:" + port_};
    for (const std::string& a : Identity(cn, cn)) args.push_back(a);
    args.insert(args.end(), action.begin(), action.end());
    return RunProgram(args);
  }
  nlohmann::json Status() {
    const CommandResult r = Admin("ops", {"--status-json"});
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return nlohmann::json::parse(r.output.substr(r.output.find('{')));
  }
  // The status once `pred` holds of it, within 60 s.
  nlohmann::json StatusOnce(const std::function<bool(const nlohmann::json&)>& pred) {
    nlohmann::json s;
    for (int t = 0; t < 300 && !pred(s = Status()); ++t)
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    return s;
  }
  static int64_t Version(const nlohmann::json& s) {
    return std::stoll(s.value("state_version", std::string("0")));
  }
};

TEST_F(OperationsTest, EnrolledSitesAndAnOperatorWhoPausesRemovesRevokesAndUnpins) {
  std::ofstream(Config()) << "allowed-clients = [\"site-1\", \"site-2\", \"site-3\"]\n"
                             "operators = [\"ops\"]\n";
  Fedlora({"certs", "init", "--dir", Ca(""), "--server-name", "localhost", "--server-name",
           "127.0.0.1"});
  for (const std::string cn : {"site-1", "site-2", "site-3"}) Enrol(cn, cn);
  Enrol("ops", "ops", {"--operator"});
  const pid_t server =
      StartServer("fedit", "state",
                  {"--config", Config(), "--tls-cert", Ca("server.pem"), "--tls-key",
                   Ca("server.key"), "--client-ca", Ca("ca.pem"), "--pin-client-certs", "--rounds",
                   "100000", "--quorum", "0.5", "--round-deadline-s", "2", "--metrics-listen",
                   "0.0.0.0:0", "--metrics-port-file", (dir_ / "metrics.port").string()});
  ASSERT_FALSE(port_.empty()) << ReadText(dir_ / "state.log");
  std::vector<pid_t> sites;
  for (int i = 1; i <= 3; ++i)
    sites.push_back(
        StartClient(i, "run", Identity("site-" + std::to_string(i), "site-" + std::to_string(i))));
  ASSERT_GE(MetricsOnceThere("state", 2).size(), 2u) << ReadText(dir_ / "state.log");

  // Only an operator acts.
  CommandResult r = Admin("site-1", {"--admin", "pause"});
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("'site-1' may not act on the run: it is not an operator"));

  // Pause: the round open closes, and no other opens until resume.
  r = Admin("ops", {"--admin", "pause"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("paused by operator ops"));
  nlohmann::json s = StatusOnce([](const nlohmann::json& s) {
    return s.value("waiting_for", "").find("paused by operator ops") != std::string::npos;
  });
  ASSERT_THAT(s.value("waiting_for", ""), HasSubstr("paused")) << s.dump();
  const int64_t paused_at = Version(s);
  std::this_thread::sleep_for(std::chrono::seconds(3));
  EXPECT_EQ(Version(Status()), paused_at);
  ASSERT_EQ(Admin("ops", {"--admin", "resume"}).exit_code, 0);
  ASSERT_GE(Version(StatusOnce([&](const nlohmann::json& s) { return Version(s) > paused_at; })),
            paused_at + 1);

  // Revoke site-3's certificate; the coordinator reads the CRL on SIGHUP and ends its session.
  Fedlora({"certs", "revoke", "--ca", Ca(""), "--cn", "site-3"});
  std::ofstream(Config(), std::ios::app) << "crl = \"" << Ca("crl.pem") << "\"\n";
  ASSERT_EQ(kill(server, SIGHUP), 0);
  EXPECT_EQ(Wait(sites[2], std::chrono::seconds(60)), 3) << ReadText(dir_ / "run-client3.log");
  EXPECT_THAT(ReadText(dir_ / "run-client3.log"), HasSubstr("site-3's certificate (serial "));
  EXPECT_THAT(ReadText(dir_ / "state.log"), HasSubstr("1 certificates revoked"));

  // A reissued certificate is held back by the pin until an operator unpins site-3.
  Enrol("site-3", "site-3-new", {"--reissue"});
  pid_t again = StartClient(3, "new", Identity("site-3", "site-3-new"));
  EXPECT_EQ(Wait(again, std::chrono::seconds(60)), 3) << ReadText(dir_ / "new-client3.log");
  EXPECT_THAT(ReadText(dir_ / "new-client3.log"), HasSubstr("it is pinned to sha256:"));
  r = Admin("ops", {"--admin", "unpin", "--admin-client", "site-3"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  again = StartClient(3, "unpinned", Identity("site-3", "site-3-new"));
  s = StatusOnce([](const nlohmann::json& s) {
    for (const auto& c : s.value("clients", nlohmann::json::array()))
      if (c.value("id", "") == "site-3" && c.value("left", "").empty()) return true;
    return false;
  });
  ASSERT_THAT(ReadText(dir_ / "state.log"), HasSubstr("site-3 is pinned to certificate")) << s;
  EXPECT_THAT(ReadText(dir_ / "state.log"), HasSubstr("site-3 re-joined"));

  // Remove site-2: it is told why and stops; the removal is recorded with the round.
  r = Admin("ops",
            {"--admin", "remove", "--admin-client", "site-2", "--admin-reason", "its key leaked"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(Wait(sites[1], std::chrono::seconds(60)), 3) << ReadText(dir_ / "run-client2.log");
  EXPECT_THAT(ReadText(dir_ / "run-client2.log"),
              HasSubstr("site-2 was removed from the run by operator ops: its key leaked"));
  bool recorded = false;
  for (int t = 0; t < 300 && !recorded; ++t) {
    for (const nlohmann::json& line : Metrics("state"))
      recorded |= line.contains("removed") && line["removed"].contains("site-2");
    if (!recorded) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  EXPECT_TRUE(recorded) << ReadText(dir_ / "state" / "metrics.jsonl");

  // Export now.
  r = Admin("ops", {"--admin", "export"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_FALSE(WaitForFile(dir_ / "state" / "export" / "global" / "adapter_config.json",
                           std::chrono::seconds(30))
                   .empty());

  // The metrics listener admits an operator by the same rules: once revoked, not there either.
  const int metrics_port = std::stoi(WaitForFile(dir_ / "metrics.port", std::chrono::seconds(10)));
  const auto scrape = [&] {
    httplib::SSLClient tls("127.0.0.1", metrics_port, (dir_ / "ops" / "ops.pem").string(),
                           (dir_ / "ops" / "ops.key").string());
    tls.set_ca_cert_path(Ca("ca.pem").c_str());
    tls.enable_server_certificate_verification(true);
    const auto res = tls.Get("/metrics");
    return res ? res->status : -1;
  };
  EXPECT_EQ(scrape(), 200);
  Fedlora({"certs", "revoke", "--ca", Ca(""), "--cn", "ops"});
  ASSERT_EQ(kill(server, SIGHUP), 0);
  int code = 200;
  for (int t = 0; t < 100 && (code = scrape()) == 200; ++t)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(code, 401);
  r = Admin("ops", {"--admin", "resume"});
  EXPECT_EQ(r.exit_code, 3) << r.output;
  EXPECT_THAT(r.output, HasSubstr("is revoked by the coordinator's CRL"));
  kill(server, SIGTERM);
  Wait(server, std::chrono::seconds(20));
}

// Without an operator list any admitted client may ask for the status, and only those: a name
// off the allow-list is refused (regression: it could, while the operator checks were added).
TEST_F(OperationsTest, WithoutOperatorsOnlyAdmittedClientsSeeTheStatus) {
  const pid_t server = StartServer("fedit", "state", {"--allowed-clients", "client-1"});
  ASSERT_FALSE(port_.empty()) << ReadText(dir_ / "state.log");
  const auto status = [&](const std::string& name) {
    return RunProgram({kBin + "/fedlora-client", "--coordinator", "localhost:" + port_, "--ca",
                       Cert("ca.pem"), "--cert", Cert(name + ".pem"), "--key", Cert(name + ".key"),
                       "--status"});
  };
  EXPECT_EQ(status("client-1").exit_code, 0);
  const CommandResult refused = status("client-2");
  EXPECT_EQ(refused.exit_code, 3) << refused.output;
  EXPECT_THAT(refused.output, HasSubstr("'client-2' is not on the allow-list"));
  const CommandResult admin = RunProgram(
      {kBin + "/fedlora-client", "--coordinator", "localhost:" + port_, "--ca", Cert("ca.pem"),
       "--cert", Cert("client-1.pem"), "--key", Cert("client-1.key"), "--admin", "pause"});
  EXPECT_EQ(admin.exit_code, 3) << admin.output;
  EXPECT_THAT(admin.output, HasSubstr("may not act on the run"));
  kill(server, SIGTERM);
  Wait(server, std::chrono::seconds(20));
}

}  // namespace
}  // namespace fedlora
