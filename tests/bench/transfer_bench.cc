// transfer_bench: the coordinator's transport, measured through fedlora-server and the real
// protocol over mutual TLS on loopback.
//   A. Upload throughput of one ~100 MB adapter (4 modules of 4096×4096 at rank 768), in 4 MiB
//      chunks, until the coordinator has verified (sha256) and validated it, next to `openssl
//      speed -evp aes-128-gcm` at 16 KiB. Environment: WINDOW (chunks in flight), CHUNK_MIB,
//      PLAINTEXT=1 (no TLS, to see what it costs), SKIP_RSS=1 (part A only).
//   B. Coordinator peak RSS (VmHWM) while 64 clients upload at once: fedit and fed-sb (summed as
//      they arrive), next to flora (which must keep every client's factors).
//   C. The ceiling and the peers: the same bytes through gRPC alone, through a plain OpenSSL TLS
//      socket, and through Python grpcio (tests/bench/grpcio_peer.py, when python3-grpcio is
//      installed: Flower's transport).
// --small runs every part at a small size in seconds (the test command's check that the bench
// runs and prints its figures; not figures to quote).
#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <thread>

#include "client/upload.h"
#include "common/base/file_util.h"
#include "common/net/tls.h"
#include "common/tensor/blob.h"
#include "fedlora/v1/coordinator.grpc.pb.h"
#include "tests/process.h"

namespace {

namespace fs = std::filesystem;
namespace v1 = fedlora::v1;
using Clock = std::chrono::steady_clock;

struct Setup {
  std::string bin, source;
  fs::path work;
  // Part A: modules of dim×dim at `rank`; part B: `clients` clients, 8 modules of b_dim×b_dim at
  // b_rank.
  int dim = 4096, rank = 768, clients = 64, b_dim = 1024, b_rank = 64;
};

// PLAINTEXT=1: the same bench without TLS (coordinator --insecure), to see what TLS costs.
bool Plaintext() { return std::getenv("PLAINTEXT") != nullptr; }

// The port a server wrote to `port_file` (empty when none came within 20 s).
std::string ReadPort(const fs::path& port_file) {
  std::string port = fedlora::testing::WaitForFile(port_file, std::chrono::seconds(20));
  while (!port.empty() && port.back() == '\n') port.pop_back();
  return port;
}

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
  *port = ReadPort(port_file);
  return pid;
}

double PeakRssMb(pid_t pid) {
  const std::string status = fedlora::testing::ReadText("/proc/" + std::to_string(pid) + "/status");
  const size_t at = status.find("VmHWM:");
  return at == std::string::npos ? 0 : std::stod(status.substr(at + 6)) / 1024.0;
}

class Client {
 public:
  Client(const Setup& s, const std::string& port, int i, bool tls = !Plaintext()) {
    const std::string certs = (s.work / "certs").string(), name = "client-" + std::to_string(i);
    id_ = name;  // without TLS the coordinator takes the caller's word for its name
    auto creds =
        !tls ? grpc::InsecureChannelCredentials()
             : *fedlora::common::ClientTlsCredentials(
                   certs + "/ca.pem", certs + "/" + name + ".pem", certs + "/" + name + ".key");
    grpc::ChannelArguments args;
    for (const auto& [key, value] : fedlora::common::TransportChannelArgs(63 << 20))
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
      if (task.kind() != v1::Task::WAIT) {
        std::fprintf(stderr, "expected a task to train, got kind %d\n", task.kind());
        std::exit(1);
      }
    }
  }
  // Returns when the coordinator accepted the update, sent as fedlora-client sends it (pipelined
  // chunks).
  void Upload(const v1::Task& task, const std::string& bytes, size_t chunk = 4 << 20) {
    v1::UploadRequest header;
    header.set_round(task.round());
    header.set_state_version(task.state_version());
    header.set_sha256(fedlora::common::Sha256Hex(bytes));
    Send(header, bytes, chunk);
  }
  void Send(v1::UploadRequest header, const std::string& bytes, size_t chunk = 4 << 20) {
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
    if (Plaintext()) context.AddMetadata(fedlora::common::kClientIdMetadata, id_);
  }
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  std::string id_;
};

// A random update for `task` (rank and scaling lora_alpha / rank from the task), as a client
// would upload it.
std::string RandomUpdate(const v1::Task& task, bool r_only, uint64_t seed) {
  std::vector<fedlora::common::ModuleShape> shapes;
  const v1::TrainSettings& t = task.settings();
  for (const auto& m : task.modules()) {
    shapes.push_back(
        {m.name(), t.rank(), m.in_features(), m.out_features(), t.lora_alpha() / t.rank(), r_only});
  }
  auto a = *fedlora::common::Adapter::Create(shapes);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::uniform_real_distribution<float> u(-0.01f, 0.01f);
  for (float& x : a.values()) x = u(rng);
  return fedlora::common::EncodeAdapter(
      a, r_only ? fedlora::common::AdapterParts::kROnly : fedlora::common::AdapterParts::kAll);
}

// User + system seconds of a process so far.
double CpuSeconds(pid_t pid) {
  const std::string stat = fedlora::testing::ReadText("/proc/" + std::to_string(pid) + "/stat");
  std::istringstream in(stat.substr(stat.rfind(')') + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && in >> field; ++i)
    if (i == 14 || i == 15) ticks += std::stod(field);
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// What part A sent, and its transfer rate (MB/s, without the coordinator's verification).
struct Sent {
  std::string bytes;
  double transfer_mb_per_s = 0;
};

Sent Throughput(const Setup& s) {
  std::string port;
  const pid_t server = StartServer(
      s, "throughput",
      {"--method", "fedit", "--min-clients", "2", "--rank", std::to_string(s.rank)}, &port);
  Client c1(s, port, 1), c2(s, port, 2);
  c1.Join(4, s.dim, s.dim);
  c2.Join(4, s.dim, s.dim);  // a second member keeps the round open: the timing is the upload's
  const v1::Task task = c1.Task();
  const std::string bytes = RandomUpdate(task, false, 1);
  const double server_cpu = CpuSeconds(server), client_cpu = CpuSeconds(getpid());
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
  const double server_busy = CpuSeconds(server) - server_cpu,
               client_busy = CpuSeconds(getpid()) - client_cpu;
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
  constexpr std::string_view kVerified = "verified and validated in ";
  const size_t at = log.find(kVerified);
  if (at == std::string::npos) {
    std::fprintf(stderr, "the coordinator's log does not say how long verification took\n");
    std::exit(1);
  }
  const double verify = std::stod(log.substr(at + kVerified.size()));
  std::printf("| transfer (%.3f s of %.3f s; chunks pipelined, WINDOW=%s) | %.0f |\n",
              seconds - verify, seconds, std::getenv("WINDOW") ? std::getenv("WINDOW") : "4",
              bytes.size() / 1e6 / (seconds - verify));
  std::printf("| until accepted (adds sha256, decoding, validation, fsync: %.3f s) | %.0f |\n",
              verify, bytes.size() / 1e6 / seconds);
  std::printf("| openssl speed -evp aes-128-gcm, 16 KiB blocks, 1 core | %s |\n", ssl.c_str());
  std::printf(
      "\nThe client's sha256 of the update, before its first chunk: %.3f s. CPU time during the "
      "upload: coordinator %.3f s, client %.3f s, in %.3f s of wall time on %ld cores.\n",
      hash_seconds, server_busy, client_busy, seconds, sysconf(_SC_NPROCESSORS_ONLN));
  std::printf(
      "The longest heartbeat of another client (one every 10 ms) during the upload: %.3f s.\n",
      longest_heartbeat);
  return {bytes, bytes.size() / 1e6 / (seconds - verify)};
}

// C. The ceiling: the same 100 MB in the same chunks through the transport alone, to servers that
// keep nothing, so that part A can be read against what this machine allows at all.

// A Coordinator whose Upload only acknowledges each chunk: what gRPC itself costs per byte.
class DiscardingCoordinator final : public v1::Coordinator::CallbackService {
  grpc::ServerUnaryReactor* Upload(grpc::CallbackServerContext* context,
                                   const v1::UploadRequest* request,
                                   v1::UploadResponse* response) override {
    const int64_t end = request->offset() + static_cast<int64_t>(request->data().size());
    response->set_received(end);
    response->set_accepted(end == request->total_size());
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status::OK);
    return reactor;
  }
};

void WritePort(const fs::path& port_file, int port) {
  if (!fedlora::common::WriteFileAtomically(port_file, std::to_string(port) + "\n").ok())
    std::exit(1);
}

// 127.0.0.1:port (0: any free port).
sockaddr_in Loopback(uint16_t port) {
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  address.sin_port = htons(port);
  return address;
}

// Child process: `--serve grpc-tls|grpc-plain`.
int ServeDiscarding(const Setup& s, bool tls, const fs::path& port_file) {
  const std::string certs = (s.work / "certs").string();
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(
      "127.0.0.1:0",
      tls ? *fedlora::common::ServerTlsCredentials(certs + "/server.pem", certs + "/server.key",
                                                   certs + "/ca.pem")
          : grpc::InsecureServerCredentials(),
      &port);
  for (const auto& [key, value] : fedlora::common::TransportChannelArgs(63 << 20))
    builder.AddChannelArgument(key, value);
  DiscardingCoordinator service;
  builder.RegisterService(&service);
  const std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (!server) return 1;
  WritePort(port_file, port);
  server->Wait();
  return 0;
}

// Mutual TLS 1.3 with OpenSSL alone, set up as the coordinator's certificates are.
SSL_CTX* RawTlsContext(const Setup& s, bool server) {
  const std::string certs = (s.work / "certs").string(), name = server ? "server" : "client-1";
  SSL_CTX* ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (SSL_CTX_use_certificate_chain_file(ctx, (certs + "/" + name + ".pem").c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(ctx, (certs + "/" + name + ".key").c_str(), SSL_FILETYPE_PEM) !=
          1 ||
      SSL_CTX_load_verify_locations(ctx, (certs + "/ca.pem").c_str(), nullptr) != 1) {
    ERR_print_errors_fp(stderr);
    std::exit(1);
  }
  SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  return ctx;
}

// Child process: `--serve raw-tls`. Per connection: an 8-byte size, then that many bytes, spooled
// to a file as the coordinator spools an upload, and a one-byte acknowledgement.
int ServeRawTls(const Setup& s, const fs::path& port_file) {
  SSL_CTX* ctx = RawTlsContext(s, true);
  const int listener = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address = Loopback(0);
  socklen_t length = sizeof address;
  if (::bind(listener, reinterpret_cast<sockaddr*>(&address), sizeof address) != 0 ||
      ::listen(listener, 4) != 0 ||
      ::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) != 0) {
    return 1;
  }
  WritePort(port_file, ntohs(address.sin_port));
  std::vector<char> buffer(4 << 20);
  for (;;) {
    SSL* ssl = SSL_new(ctx);
    SSL_set_fd(ssl, ::accept(listener, nullptr, nullptr));
    uint64_t size = 0;
    if (SSL_accept(ssl) == 1 && SSL_read(ssl, &size, sizeof size) == sizeof size) {
      const int out = ::open((s.work / "raw-tls.part").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
      uint64_t got = 0;
      for (int n; got < size && (n = SSL_read(ssl, buffer.data(), buffer.size())) > 0; got += n) {
        if (::pwrite(out, buffer.data(), n, static_cast<off_t>(got)) != n) return 1;
      }
      ::close(out);
      SSL_write(ssl, "k", 1);
    }
    ::close(SSL_get_fd(ssl));
    SSL_free(ssl);
  }
}

// One upload of `bytes` to ServeRawTls at `port` (after the handshake, which is not timed).
double RawTlsUpload(SSL_CTX* ctx, const std::string& port, const std::string& bytes) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  const sockaddr_in address = Loopback(static_cast<uint16_t>(std::stoi(port)));
  SSL* ssl = SSL_new(ctx);
  SSL_set_fd(ssl, fd);
  SSL_set_tlsext_host_name(ssl, "localhost");
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&address), sizeof address) != 0 ||
      SSL_connect(ssl) != 1) {
    ERR_print_errors_fp(stderr);
    std::exit(1);
  }
  const auto start = Clock::now();
  const uint64_t size = bytes.size();
  bool ok = SSL_write(ssl, &size, sizeof size) == sizeof size;
  for (size_t at = 0; ok && at < bytes.size(); at += 4 << 20) {
    const int n = static_cast<int>(std::min<size_t>(4 << 20, bytes.size() - at));
    ok = SSL_write(ssl, bytes.data() + at, n) == n;
  }
  char ack = 0;
  ok = ok && SSL_read(ssl, &ack, 1) == 1;
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  SSL_free(ssl);
  ::close(fd);
  if (!ok) {
    std::fprintf(stderr, "raw TLS upload failed\n");
    std::exit(1);
  }
  return seconds;
}

// Python grpcio (grpcio_peer.py) with the same bytes and chunks over mutual TLS: its best MB/s of
// three runs and the CPU seconds per run of both ends; 0 MB/s when python3-grpcio is missing.
std::pair<double, double> PythonGrpcio(const Setup& s, const std::string& bytes) {
  // Debian's python (not one earlier on PATH), whose dist-packages hold python3-grpcio.
  const std::string python = "/usr/bin/python3";
  if (std::system((python + " -c 'import grpc' > /dev/null 2>&1").c_str()) != 0) return {0, 0};
  const std::string script = s.source + "/tests/bench/grpcio_peer.py";
  const fs::path port_file = s.work / "grpcio.port", data = s.work / "update.bin",
                 out = s.work / "grpcio.json";
  fs::remove(port_file);
  if (!fedlora::common::WriteFileAtomically(data, bytes).ok()) std::exit(1);
  const pid_t server = fedlora::testing::Start(
      {python, script, "serve", "--certs", (s.work / "certs").string(), "--port-file",
       port_file.string(), "--spool", (s.work / "grpcio.part").string()},
      s.work / "grpcio.log");
  const std::string port = ReadPort(port_file);
  const double cpu0 = CpuSeconds(server);
  const std::string upload = python + " " + script + " upload --certs " +
                             (s.work / "certs").string() + " --port " + port + " --data " +
                             data.string() + " --runs 3 > " + out.string();
  const int rc = std::system(upload.c_str());
  const double server_cpu = (CpuSeconds(server) - cpu0) / 3;
  kill(server, SIGTERM);
  fedlora::testing::Wait(server, std::chrono::seconds(20));
  if (rc != 0) {
    std::fprintf(stderr, "the grpcio peer failed (%s)\n", (s.work / "grpcio.log").c_str());
    std::exit(1);
  }
  const nlohmann::json result = nlohmann::json::parse(fedlora::testing::ReadText(out));
  double best = 0;
  for (double r : result["mb_per_s"]) best = std::max(best, r);
  return {best, server_cpu + result["cpu_s"].get<double>()};
}

void Ceiling(const Setup& s, const Sent& sent, double aes_mb_per_s) {
  const std::string& bytes = sent.bytes;
  double raw_tls = 0;  // the OpenSSL socket's best MB/s
  std::printf(
      "\n### C. The ceiling: the same %.1f MB through the transport alone (gRPC: 4 MiB chunks, 4 "
      "in flight, as in A, to a service that acknowledges and drops them; OpenSSL: 4 MiB writes on "
      "one TLS 1.3 connection, spooled to a file as the coordinator spools). Three runs each, "
      "after "
      "the connection is up.\n\n",
      bytes.size() / 1e6);
  std::printf("| transport | MB/s | CPU s per 100 MB, both ends |\n|---|---|---|\n");
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  for (const std::string mode : {"grpc-tls", "grpc-plain", "raw-tls"}) {
    const fs::path port_file = s.work / (mode + ".port");
    fs::remove(port_file);
    const pid_t server = fedlora::testing::Start(
        {self, "--work", s.work.string(), "--serve", mode, "--port-file", port_file.string()},
        s.work / (mode + ".log"));
    const std::string port = ReadPort(port_file);
    std::unique_ptr<Client> client;
    SSL_CTX* ctx = nullptr;
    if (mode == "raw-tls") {
      ctx = RawTlsContext(s, false);
    } else {
      client = std::make_unique<Client>(s, port, 1, mode == "grpc-tls");
      client->Send({}, "warm-up");  // the connection and its handshake, untimed
    }
    double lo = 1e30, hi = 0, cpu = 0;
    for (int run = 0; run < 3; ++run) {
      const double cpu0 = CpuSeconds(server) + CpuSeconds(getpid());
      double seconds = 0;
      if (ctx != nullptr) {
        seconds = RawTlsUpload(ctx, port, bytes);
      } else {
        const auto start = Clock::now();
        client->Send({}, bytes);
        seconds = std::chrono::duration<double>(Clock::now() - start).count();
      }
      cpu += (CpuSeconds(server) + CpuSeconds(getpid()) - cpu0) / 3;
      lo = std::min(lo, bytes.size() / 1e6 / seconds);
      hi = std::max(hi, bytes.size() / 1e6 / seconds);
    }
    if (ctx != nullptr) SSL_CTX_free(ctx);
    kill(server, SIGTERM);
    fedlora::testing::Wait(server, std::chrono::seconds(20));
    std::printf("| %s | %.0f-%.0f | %.3f |\n",
                mode == "grpc-tls"     ? "gRPC over mutual TLS (as fedlora)"
                : mode == "grpc-plain" ? "gRPC without TLS"
                                       : "OpenSSL mutual TLS socket, no gRPC",
                lo, hi, cpu * 100e6 / bytes.size());
    if (mode == "raw-tls") raw_tls = hi;
  }
  const auto [grpcio, grpcio_cpu] = PythonGrpcio(s, bytes);
  if (grpcio > 0) {
    std::printf("| Python grpcio over mutual TLS (Flower's transport; best of 3) | %.0f | %.3f |\n",
                grpcio, grpcio_cpu * 100e6 / bytes.size());
  } else {
    std::printf("| Python grpcio | not measured: python3-grpcio is not installed | |\n");
  }
  std::printf(
      "\nfedlora's upload (part A's transfer, %.0f MB/s) is %.0f%% of the OpenSSL socket's %.0f "
      "MB/s "
      "(goal: at least 80%%)",
      sent.transfer_mb_per_s, 100 * sent.transfer_mb_per_s / raw_tls, raw_tls);
  if (grpcio > 0)
    std::printf(" and %.2f× Python grpcio's %.0f MB/s (goal: at least 1.5×)",
                sent.transfer_mb_per_s / grpcio, grpcio);
  std::printf(".\n");
  const double goal = aes_mb_per_s / 4;
  std::printf(
      "\n25%% of AES-GCM is %.0f MB/s: 100 MB in %.3f s. On %ld cores that allows at most %.3f "
      "CPU seconds per 100 MB for both ends together.\n",
      goal, 100 / goal, sysconf(_SC_NPROCESSORS_ONLN),
      static_cast<double>(sysconf(_SC_NPROCESSORS_ONLN)) * 100 / goal);
}

void ManyClients(const Setup& s, const std::string& method) {
  const int clients = s.clients, modules = 8, dim = s.b_dim, rank = s.b_rank;
  std::string port;
  const pid_t server = StartServer(
      s, "rss-" + method,
      {"--method", method, "--min-clients", std::to_string(clients), "--rank", std::to_string(rank),
       "--rounds", "1", "--linger-s", "600", "--fed-sb-init", "random"},
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
      start.arrive_and_wait();              // all upload at once
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
  std::string work = "out/transfer-bench", serve, port_file;
  bool small = false;
  app.add_option("--work", work)->capture_default_str();
  app.add_flag("--small", small, "every part at a small size, in seconds (a check, not figures)");
  app.add_option("--serve", serve, "internal: run part C's server (grpc-tls, grpc-plain, raw-tls)");
  app.add_option("--port-file", port_file, "internal: where --serve writes its port");
  CLI11_PARSE(app, argc, argv);
  s.work = fs::absolute(work);
  if (small) {
    s.dim = 512, s.rank = 96, s.clients = 4, s.b_dim = 128, s.b_rank = 8;
  }
  if (serve == "raw-tls") return ServeRawTls(s, port_file);
  if (!serve.empty()) return ServeDiscarding(s, serve == "grpc-tls", port_file);
  fs::create_directories(s.work);
  if (std::system(("bash " + s.source + "/deploy/make_certs.sh " + (s.work / "certs").string() +
                   " " + std::to_string(std::max(s.clients, 2)) + " > /dev/null")
                      .c_str()) != 0) {
    return 1;
  }
  // openssl speed's last line: "AES-128-GCM  <16 B> … <16384 B>" in 1000s of bytes per second.
  const std::string cmd = "openssl speed -evp aes-128-gcm -bytes 16384 -seconds " +
                          std::string(small ? "1" : "3") +
                          " 2>/dev/null | tail -1 | "
                          "awk '{v=$NF; sub(/k$/,\"\",v); printf \"%.0f\", v/1000}' > " +
                          (s.work / "openssl.txt").string();
  if (std::system(cmd.c_str()) != 0) return 1;
  const Sent sent = Throughput(s);
  std::printf(
      "\n### B. Coordinator peak RSS, %d clients uploading at once (8 modules of %dx%d, rank %d, 1 "
      "MiB chunks)\n\n",
      s.clients, s.b_dim, s.b_dim, s.b_rank);
  std::printf(
      "| method | update MB | all updates MB | RSS after joins MB | peak RSS MB "
      "|\n|---|---|---|---|---|\n");
  if (std::getenv("SKIP_RSS") == nullptr) {
    for (const std::string method : {"fedit", "fed-sb", "flora"}) ManyClients(s, method);
  }
  Ceiling(s, sent, std::stod(fedlora::testing::ReadText(s.work / "openssl.txt")));
  return 0;
}
