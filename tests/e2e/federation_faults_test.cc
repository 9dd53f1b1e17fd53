// Faults a real federation survives: killed clients and coordinators, a full disk, broken
// downloads — each ending with the result of the run without the fault.
#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

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
  // Cohorts, task seeds and training are seeded, and a round's updates are folded in client order
  // whatever order they arrive in: the same bytes.
  EXPECT_EQ(finals[0], finals[1]);
}

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
  if (testing::RunProgram({"mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", disk.string()})
          .exit_code != 0)
    GTEST_SKIP() << "cannot mount a tmpfs here";
  struct Unmount {
    fs::path path;
    ~Unmount() { testing::RunProgram({"umount", "-l", path.string()}); }
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
      testing::RunProgram({"dd", "if=/dev/zero", "of=" + (disk / "filler").string(),
                           fmt::format("bs={}", page),
                           fmt::format("count={}", free_pages - 3 * pages - 1)});
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
