// What a coordinator refuses, and how a run goes on: strangers and wrong certificates, a second
// process with one identity, broken and late updates from a client that speaks the protocol
// directly, concurrent retries; SIGUSR1 exports and the operator's status mid-run.
#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

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
  for (const testing::Args& script : {testing::Args{kSource + "/deploy/make_certs.sh", other, "1"},
                                      testing::Args{(dir_ / "dated.sh").string()}}) {
    const testing::CommandResult made = testing::RunProgram(testing::Argv("bash", script));
    ASSERT_EQ(made.exit_code, 0) << made.output;
  }
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
       "'client-3' is an operator (--operators): it may ask for the status and act on the run, not "
       "train"},
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
  v1::StatusResponse Status() {
    v1::StatusResponse response;
    grpc::ClientContext context;
    EXPECT_TRUE(stub_->GetStatus(&context, v1::StatusRequest(), &response).ok());
    return response;
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
  // Every refusal is made by one client here: it is not removed after three (--max-rejections 0).
  const pid_t server =
      StartServer("fedit", "state", {"--max-update-bytes", "20000", "--max-rejections", "0"});
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
  // The task's update bounds what may be sent, below --max-update-bytes: 2 modules, each A [4,24]
  // and B [20,4] in f32 (704 bytes) and two header entries (256 + 2 × 31-byte name each), plus 8 +
  // 4096 for the header's length and metadata: 2 × (704 + 2 × 318) + 4104 = 6784.
  expect(c1.Upload(task, good, &r, {}, 0, 0, 1 << 20), grpc::StatusCode::RESOURCE_EXHAUSTED,
         "update of 1048576 bytes exceeds the limit of 6784 bytes");
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
  // The shape, NaN, Inf, size, checksum and garbage uploads: client-1 listed once, with six.
  EXPECT_EQ(metrics[0]["rejected"], nlohmann::json({{"client-1", 6}}));
  kill(server, SIGTERM);
  testing::Wait(server, std::chrono::seconds(10));
  const std::string log = testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(
      log,
      HasSubstr(
          "rejected client-1's update: module model.layers.0.self_attn.q_proj: lora_A has shape"));
}

// With the defaults, a client with a rejected update in three rounds is removed from the run: it
// leaves the round's cohort and quorum, its further calls (and joins) are refused with the reason,
// the round closes without it, and the status and the metrics line name it. Refusals within one
// round (a node retries; every chunk is checked) count as one.
TEST_F(FederationTest, AClientRejectedInThreeRoundsIsRemovedFromTheRun) {
  const pid_t server = StartServer("fedit", "state");
  ASSERT_FALSE(port_.empty());
  client::RegressionOptions opts;
  opts.layers = 2;
  opts.in_features = 24;
  opts.out_features = 20;
  const client::RegressionWorkload workload(opts);
  const std::string certs = (dir_ / "certs").string();
  RawClient c1(port_, certs, "client-1"), c2(port_, certs, "client-2"),
      c3(port_, certs, "client-3");
  ASSERT_TRUE(c1.Join(workload).ok());
  ASSERT_TRUE(c2.Join(workload).ok());
  ASSERT_TRUE(c3.Join(workload).ok());
  v1::UploadResponse r;
  for (int64_t round = 1; round <= 3; ++round) {
    const v1::Task t1 = c1.Task();
    ASSERT_EQ(t1.round(), round);
    const std::string bad = common::EncodeAdapter(Update(t1, 4, NAN));
    const grpc::Status first = c1.Upload(t1, bad, &r);
    if (round < 3) {
      EXPECT_EQ(first.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << first.error_message();
      // Sent again, and too large: refused, and still one strike this round.
      EXPECT_EQ(c1.Upload(t1, bad, &r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
      EXPECT_EQ(c1.Upload(t1, bad, &r, {}, 0, 0, 1 << 20).error_code(),
                grpc::StatusCode::RESOURCE_EXHAUSTED);
      ASSERT_TRUE(c1.Upload(t1, common::EncodeAdapter(Update(t1, 4, 0.01f)), &r).ok());
    } else {  // the third round's refusal is answered with the removal
      EXPECT_EQ(first.error_code(), grpc::StatusCode::PERMISSION_DENIED);
      EXPECT_THAT(first.error_message(),
                  HasSubstr("client-1 was removed from the run after 3 rounds with a rejected "
                            "update (--max-rejections; the last: "));
      const grpc::Status after = c1.Upload(t1, bad, &r);
      EXPECT_EQ(after.error_code(), grpc::StatusCode::PERMISSION_DENIED);
      const grpc::Status rejoin = c1.Join(workload);
      EXPECT_EQ(rejoin.error_code(), grpc::StatusCode::PERMISSION_DENIED);
      EXPECT_THAT(rejoin.error_message(), HasSubstr("client-1 was removed from the run"));
      const v1::StatusResponse status = c2.Status();
      ASSERT_EQ(status.clients_size(), 3);
      EXPECT_EQ(status.clients(0).id(), "client-1");
      EXPECT_EQ(status.clients(0).rejected_updates(), 3);
      EXPECT_THAT(status.clients(0).removed(), HasSubstr("after 3 rounds with a rejected update"));
      EXPECT_EQ(status.clients(1).removed(), "");
    }
    const v1::Task t2 = c2.Task(), t3 = c3.Task();
    ASSERT_TRUE(c2.Upload(t2, common::EncodeAdapter(Update(t2, 4, 0.03f)), &r).ok());
    ASSERT_TRUE(c3.Upload(t3, common::EncodeAdapter(Update(t3, 4, 0.05f)), &r).ok());
    ASSERT_EQ(MetricsOnceThere("state", static_cast<size_t>(round)).size(),
              static_cast<size_t>(round));
  }
  const auto metrics = Metrics("state");
  EXPECT_EQ(metrics[0]["rejected"], nlohmann::json({{"client-1", 3}}));
  EXPECT_EQ(metrics[0]["arrived"].size(), 3u);
  // Round 3 closed with the two left (quorum 0.8 of the two still asked).
  EXPECT_EQ(metrics[2]["arrived"], nlohmann::json({"client-2", "client-3"}));
  EXPECT_THAT(metrics[2]["removed"]["client-1"].get<std::string>(),
              HasSubstr("after 3 rounds with a rejected update"));
  kill(server, SIGTERM);
  testing::Wait(server, std::chrono::seconds(10));
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

  const auto metrics = MetricsOnceThere("state", 1);
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

// SIGHUP reads the config file again: a half-edited file keeps every old setting and says where
// it is wrong; a client taken off the allow-list is refused at its next call (fedlora-client exits
// 3) and the run goes on without it. Regression: SIGHUP killed the coordinator without a line.
TEST_F(FederationTest, SighupReloadsTheAllowListAndABadFileChangesNothing) {
  const fs::path config = dir_ / "server.toml";
  std::ofstream(config) << "allowed-clients = [\"client-1\", \"client-2\", \"client-3\"]\n";
  const pid_t server = StartServer("fedit", "state",
                                   {"--config", config.string(), "--rounds", "100000", "--quorum",
                                    "0.5", "--round-deadline-s", "2", "--linger-s", "1"});
  ASSERT_FALSE(port_.empty()) << ReadText(dir_ / "state.log");
  std::vector<pid_t> clients;
  for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, "run"));
  ASSERT_GE(MetricsOnceThere("state", 2).size(), 2u) << ReadText(dir_ / "state.log");

  std::ofstream(config) << "allowed-clients = [\"client-1\", \"client-2\"\n";  // unclosed
  ASSERT_EQ(kill(server, SIGHUP), 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  ASSERT_EQ(kill(server, 0), 0) << "SIGHUP ended the coordinator";
  EXPECT_THAT(ReadText(dir_ / "state.log"),
              HasSubstr("SIGHUP: keeping the old settings: " + config.string() + ":1:"));

  std::ofstream(config) << "allowed-clients = [\"client-1\", \"client-2\"]\n";
  ASSERT_EQ(kill(server, SIGHUP), 0);
  EXPECT_EQ(Wait(clients[2], std::chrono::seconds(60)), 3) << ReadText(dir_ / "run-client3.log");
  EXPECT_THAT(ReadText(dir_ / "run-client3.log"),
              HasSubstr("client identity 'client-3' is not on the allow-list"));
  const std::string log = ReadText(dir_ / "state.log");
  EXPECT_THAT(log, HasSubstr("SIGHUP: allowed_clients -client-3; operators unchanged"));
  // The run goes on with the two: later rounds' cohorts leave client-3 out.
  const size_t seen = Metrics("state").size();
  const auto lines = MetricsOnceThere("state", seen + 3);
  ASSERT_GE(lines.size(), seen + 3) << log;
  EXPECT_EQ(lines.back()["cohort"], nlohmann::json({"client-1", "client-2"}));
  kill(server, SIGTERM);
  Wait(server, std::chrono::seconds(20));
}

}  // namespace
}  // namespace fedlora
