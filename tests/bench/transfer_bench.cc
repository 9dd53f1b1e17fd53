// transfer_bench: the coordinator's transport, measured through fedlora-server and the real
// protocol over mutual TLS on loopback.
//   A. Upload throughput of one ~100 MB adapter (4 modules of 4096×4096 at rank 768), in 4 MiB
//      chunks, until the coordinator has verified (sha256) and validated it, next to `openssl
//      speed -evp aes-128-gcm` at 16 KiB. Environment: WINDOW (chunks in flight), CHUNK_MIB,
//      PLAINTEXT=1 (no TLS, to see what it costs), SKIP_RSS=1 (part A only).
//   B. Coordinator peak RSS (VmHWM) while 64 clients upload at once: fedit and fed-sb (summed as
//      they arrive), next to flora (which must keep every client's factors).
#include <grpcpp/grpcpp.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <random>
#include <sstream>
#include <thread>

#include "client/upload.h"
#include "common/blob.h"
#include "common/tls.h"
#include "fedlora/v1/coordinator.grpc.pb.h"
#include "tests/process.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = fedlora::v1;
using Clock = std::chrono::steady_clock;

struct Setup {
  std::string bin, source;
  fs::path work;
};

// PLAINTEXT=1: the same bench without TLS (coordinator --insecure), to see what TLS costs.
bool Plaintext() { return std::getenv("PLAINTEXT") != nullptr; }

pid_t StartServer(const Setup& s, const std::string& name, std::vector<std::string> flags,
                  std::string* port) {
  const fs::path state = s.work / name, port_file = s.work / (name + ".port");
  fs::remove_all(state);
  fs::remove(s.work / (name + ".log"));  // the verification time is read back from it
  fs::remove(port_file);
  std::vector<std::string> argv = {s.bin + "/fedlora-server",
                                   "--state-dir",
                                   state.string(),
                                   "--listen",
                                   "127.0.0.1:0",
                                   "--port-file",
                                   port_file.string(),
                                   "--round-deadline-s",
                                   "600",
                                   "--chunk-bytes",
                                   std::to_string(4 << 20),
                                   "--max-update-bytes",
                                   std::to_string(512 << 20)};
  argv.insert(argv.end(), flags.begin(), flags.end());
  if (Plaintext()) {
    argv.push_back("--insecure");
  } else {
    for (const char* f : {"--tls-cert", "server.pem", "--tls-key", "server.key", "--client-ca"})
      argv.push_back(f[0] == '-' ? f : (s.work / "certs" / f).string());
    argv.push_back((s.work / "certs/ca.pem").string());
  }
  const pid_t pid = fedlora::testing::Start(argv, s.work / (name + ".log"));
  *port = fedlora::testing::WaitForFile(port_file, std::chrono::seconds(20));
  while (!port->empty() && port->back() == '\n') port->pop_back();
  return pid;
}

double PeakRssMb(pid_t pid) {
  const std::string status = fedlora::testing::ReadText("/proc/" + std::to_string(pid) + "/status");
  const size_t at = status.find("VmHWM:");
  return at == std::string::npos ? 0 : std::stod(status.substr(at + 6)) / 1024.0;
}

class Client {
 public:
  Client(const Setup& s, const std::string& port, int i) {
    const std::string certs = (s.work / "certs").string(), name = "client-" + std::to_string(i);
    id_ = name;  // without TLS the coordinator takes the caller's word for its name
    auto creds = Plaintext() ? grpc::InsecureChannelCredentials()
                             : *fedlora::common::ClientTlsCredentials(certs + "/ca.pem",
                                                                      certs + "/" + name + ".pem",
                                                                      certs + "/" + name + ".key");
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    args.SetMaxSendMessageSize(64 << 20);
    for (const auto& [key, value] : fedlora::common::TransportChannelArgs())
      args.SetInt(key, value);
    stub_ = v1::Coordinator::NewStub(grpc::CreateCustomChannel("localhost:" + port, creds, args));
  }
  void Join(int modules, int n, int m) {
    v1::JoinRequest request;
    request.set_base_model_sha256(std::string(64, 'b'));
    request.set_max_rank(4096);
    request.set_num_examples(100);
    for (int i = 0; i < modules; ++i) {
      v1::ModuleSpec* spec = request.add_modules();
      spec->set_name("model.layers." + std::to_string(i) + ".self_attn.q_proj");
      spec->set_in_features(n);
      spec->set_out_features(m);
    }
    v1::JoinResponse response;
    grpc::ClientContext context;
    Name(context);
    Check(stub_->Join(&context, request, &response), "join");
  }
  // One heartbeat's round trip, in seconds.
  double Heartbeat(int64_t round) {
    v1::HeartbeatRequest request;
    request.set_round(round);
    v1::HeartbeatResponse response;
    grpc::ClientContext context;
    Name(context);
    const auto start = Clock::now();
    Check(stub_->Heartbeat(&context, request, &response), "heartbeat");
    return std::chrono::duration<double>(Clock::now() - start).count();
  }
  v1::Task Task() {
    for (;;) {
      v1::GetTaskRequest request;
      request.set_have_version(1 << 30);  // the bench needs no download
      request.set_max_wait_ms(10000);
      v1::Task task;
      grpc::ClientContext context;
      Name(context);
      Check(stub_->GetTask(&context, request, &task), "task");
      if (task.kind() == v1::Task::TRAIN) return task;
    }
  }
  // Returns when the coordinator accepted the update, sent as fedlora-client sends it (pipelined
  // chunks).
  void Upload(const v1::Task& task, const std::string& bytes, size_t chunk = 4 << 20) {
    v1::UploadRequest header;
    header.set_round(task.round());
    header.set_state_version(task.state_version());
    header.set_sha256(fedlora::common::Sha256Hex(bytes));
    header.set_total_size(static_cast<int64_t>(bytes.size()));
    fedlora::client::UploadSettings settings;
    settings.chunk_bytes = static_cast<int64_t>(chunk);
    if (const char* c = std::getenv("CHUNK_MIB")) settings.chunk_bytes = std::atoll(c) << 20;
    if (const char* w = std::getenv("WINDOW"))
      settings.window = std::atoi(w);  // chunks in flight (default 4)
    Check(fedlora::client::UploadInChunks(header, bytes, settings,
                                          [&](const v1::UploadRequest& r, v1::UploadResponse* out) {
                                            grpc::ClientContext context;
                                            Name(context);
                                            return stub_->Upload(&context, r, out);
                                          }),
          "upload");
  }

 private:
  static void Check(const grpc::Status& s, const char* what) {
    if (!s.ok()) {
      std::fprintf(stderr, "%s failed: %s\n", what, s.error_message().c_str());
      std::exit(1);
    }
  }
  void Name(grpc::ClientContext& context) const {
    if (Plaintext()) context.AddMetadata("x-fedlora-client-id", id_);
  }
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  std::string id_;
};

// A random update for `task` (rank from the task), as a client would upload it.
std::string RandomUpdate(const v1::Task& task, bool r_only, uint64_t seed) {
  std::vector<fedlora::common::ModuleShape> shapes;
  for (const auto& m : task.modules()) {
    shapes.push_back(
        {m.name(), task.settings().rank(), m.in_features(), m.out_features(), 1.0, r_only});
  }
  auto a = *fedlora::common::Adapter::Create(shapes);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_real_distribution<float> u(-0.01f, 0.01f);
  for (float& x : a.values()) x = u(rng);
  return fedlora::common::EncodeAdapter(
      a, r_only ? fedlora::common::AdapterParts::kROnly : fedlora::common::AdapterParts::kAll);
}

void Throughput(const Setup& s) {
  std::string port;
  const pid_t server = StartServer(
      s, "throughput", {"--method", "fedit", "--min-clients", "2", "--rank", "768"}, &port);
  Client c1(s, port, 1), c2(s, port, 2);
  c1.Join(4, 4096, 4096);
  c2.Join(4, 4096,
          4096);  // a second member keeps the round open, so the timing is the upload alone
  const v1::Task task = c1.Task();
  const std::string bytes = RandomUpdate(task, false, 1);
  auto cpu = [](pid_t pid) {  // user + system seconds of a process
    const std::string stat = fedlora::testing::ReadText("/proc/" + std::to_string(pid) + "/stat");
    std::istringstream in(stat.substr(stat.rfind(')') + 2));
    std::string field;
    double ticks = 0;
    for (int i = 3; i <= 15 && in >> field; ++i)
      if (i == 14 || i == 15) ticks += std::stod(field);
    return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
  };
  const double server_cpu = cpu(server), client_cpu = cpu(getpid());
  // Meanwhile the other member heartbeats every 10 ms: how long does the coordinator keep it
  // waiting?
  std::atomic<bool> uploading = true;
  double longest_heartbeat = 0;
  std::thread heartbeats([&] {
    for (; uploading; std::this_thread::sleep_for(std::chrono::milliseconds(10)))
      longest_heartbeat = std::max(longest_heartbeat, c2.Heartbeat(task.round()));
  });
  const auto start = Clock::now();
  c1.Upload(task, bytes);  // until accepted: received, sha256-verified and validated
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  uploading = false;
  heartbeats.join();
  const double server_busy = cpu(server) - server_cpu, client_busy = cpu(getpid()) - client_cpu;
  const auto hash_start = Clock::now();
  const std::string sha = fedlora::common::Sha256Hex(bytes);  // what the client does first
  const double hash_seconds = std::chrono::duration<double>(Clock::now() - hash_start).count();
  kill(server, SIGTERM);
  fedlora::testing::Wait(server, std::chrono::seconds(20));
  const std::string ssl = fedlora::testing::ReadText(s.work / "openssl.txt");
  std::printf("\n### A. One update of %.1f MB over mutual TLS on loopback (4 MiB chunks)\n\n",
              bytes.size() / 1e6);
  std::printf("| what | MB/s |\n|---|---|\n");
  // The coordinator logs how long verification took; the rest of the time is the transfer.
  const std::string log = fedlora::testing::ReadText(s.work / "throughput.log");
  const size_t at = log.find("validated and folded in ");
  const double verify = at == std::string::npos ? 0 : std::stod(log.substr(at + 24));
  std::printf("| transfer (%.3f s of %.3f s; chunks pipelined, WINDOW=%s) | %.0f |\n",
              seconds - verify, seconds, std::getenv("WINDOW") ? std::getenv("WINDOW") : "4",
              bytes.size() / 1e6 / (seconds - verify));
  std::printf("| until accepted (adds sha256, validation, fsync, FedIT fold: %.3f s) | %.0f |\n",
              verify, bytes.size() / 1e6 / seconds);
  std::printf("| openssl speed -evp aes-128-gcm, 16 KiB blocks, 1 core | %s |\n", ssl.c_str());
  std::printf(
      "\nThe client's sha256 of the update, before its first chunk: %.3f s. CPU time during the "
      "upload: coordinator %.3f s, client %.3f s, in %.3f s of wall time on %ld cores.\n",
      hash_seconds, server_busy, client_busy, seconds, sysconf(_SC_NPROCESSORS_ONLN));
  std::printf(
      "The longest heartbeat of another client (one every 10 ms) during the upload: %.3f s.\n",
      longest_heartbeat);
}

void SixtyFourClients(const Setup& s, const std::string& method) {
  const int clients = 64, modules = 8, dim = 1024, rank = 64;
  std::string port;
  const pid_t server =
      StartServer(s, "rss-" + method,
                  {"--method", method, "--min-clients", std::to_string(clients), "--rank",
                   std::to_string(rank), "--rounds", "1", "--linger-s", "600"},
                  &port);
  std::vector<std::unique_ptr<Client>> cs;
  for (int i = 1; i <= clients; ++i) cs.push_back(std::make_unique<Client>(s, port, i));
  for (auto& c : cs) c->Join(modules, dim, dim);
  const double before = PeakRssMb(server);
  std::barrier start(clients);
  std::vector<std::thread> threads;
  size_t update_bytes = 0;
  for (int i = 0; i < clients; ++i) {
    threads.emplace_back([&, i] {
      const v1::Task task = cs[i]->Task();
      const std::string bytes = RandomUpdate(task, method == "fed-sb", i + 1);
      if (i == 0) update_bytes = bytes.size();
      start.arrive_and_wait();              // all 64 upload at once
      cs[i]->Upload(task, bytes, 1 << 20);  // 1 MiB chunks
    });
  }
  for (auto& t : threads) t.join();
  for (int t = 0;
       t < 600 && fedlora::testing::ReadText(s.work / ("rss-" + method) / "metrics.jsonl").empty();
       ++t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const double peak = PeakRssMb(server);
  kill(server, SIGTERM);
  fedlora::testing::Wait(server, std::chrono::seconds(20));
  std::printf("| %s | %.2f | %.1f | %.0f | %.0f |\n", method.c_str(), update_bytes / 1e6,
              clients * update_bytes / 1e6, before, peak);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Transport benchmarks of fedlora-server"};
  Setup s;
  s.bin = FEDLORA_BIN_DIR;
  s.source = FEDLORA_SOURCE_DIR;
  std::string work = "out/transfer-bench";
  app.add_option("--work", work)->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  s.work = fs::absolute(work);
  fs::create_directories(s.work);
  if (std::system(("bash " + s.source + "/deploy/make_certs.sh " + (s.work / "certs").string() +
                   " 64 > /dev/null")
                      .c_str()) != 0) {
    return 1;
  }
  // openssl speed's last line: "AES-128-GCM  <16 B> … <16384 B>" in 1000s of bytes per second.
  const std::string cmd =
      "openssl speed -evp aes-128-gcm -bytes 16384 -seconds 3 2>/dev/null | tail -1 | "
      "awk '{v=$NF; sub(/k$/,\"\",v); printf \"%.0f\", v/1000}' > " +
      (s.work / "openssl.txt").string();
  if (std::system(cmd.c_str()) != 0) return 1;
  Throughput(s);
  std::printf(
      "\n### B. Coordinator peak RSS, 64 clients uploading at once (8 modules of 1024x1024, rank "
      "64, 1 MiB chunks)\n\n");
  std::printf(
      "| method | update MB | all updates MB | RSS after joins MB | peak RSS MB "
      "|\n|---|---|---|---|---|\n");
  if (std::getenv("SKIP_RSS") == nullptr) {
    for (const std::string method : {"fedit", "fed-sb", "flora"}) SixtyFourClients(s, method);
  }
  return 0;
}
