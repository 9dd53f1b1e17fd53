// load_bench: the real coordinator (fedlora-server, a process of its own) under many clients over
// mutual TLS, driven from this one process: each simulated client has its own certificate (made
// here, signed by the run's CA), its own channel and TLS connection, and goes through the protocol
// as fedlora-client does — Join, long-polled GetTask, Download of every blob it lacks (chunked,
// sha256-checked), Upload of its update (chunked) — on gRPC's callback API, so that thousands of
// clients need no thread each. Training takes no time: every client uploads a fixed update of the
// run's shapes, so what is measured is the coordinator. Prints, per round, the wall time between
// round closes and the coordinator's CPU seconds, and at the end its peak RSS (VmHWM) and the
// generator's own CPU seconds and peak RSS. With --secure-aggregation every client also runs its
// side of the protocol (common/secagg/protocol.h, the real crypto: signed keys, sealed shares,
// masks, consent, reveal) and uploads its masked input; the bytes each client moves, protocol
// messages included, are printed per round.
//   load_bench --clients 1000 --method fed-sb [--rounds 3 --layers 32 --features 512 --rank 16]
//              [--secure-aggregation]
#include <grpcpp/grpcpp.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <sys/resource.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <thread>

#include "common/base/file_util.h"
#include "common/base/proc_stats.h"
#include "common/base/strings.h"
#include "common/net/tls.h"
#include "common/secagg/protocol.h"
#include "common/secagg/quantise.h"
#include "common/tensor/blob.h"
#include "fedlora/v1/coordinator.grpc.pb.h"
#include "tests/process.h"

// After Eigen's headers (if any): httplib.h brings <resolv.h>, whose macros break them.
#include <httplib.h>

namespace {

namespace fs = std::filesystem;
namespace v1 = fedlora::v1;
using Clock = std::chrono::steady_clock;
using fedlora::common::StrCat;

struct Options {
  int clients = 100;
  std::string method = "fed-sb";
  int rounds = 3;
  int layers = 32;     // modules: q_proj and v_proj of each layer
  int features = 512;  // each module features×features (Llama-7B: 4096)
  int rank = 16;
  int poll_ms = 5000;  // a long poll's length, as fedlora-client asks; the coordinator allows it
  // Idle: the run never starts (it waits for one client more), so the clients stay connected,
  // long-polling; the coordinator's RSS is measured then, and `scrapes` scrapes of its /metrics
  // and /api/run are timed.
  bool idle = false;
  int scrapes = 0;
  bool secure = false;  // --secure-aggregation secagg+
  std::string bin = FEDLORA_BIN_DIR;
  std::string source = FEDLORA_SOURCE_DIR;
  fs::path work = "out/load";
};

// ---- Certificates: the run's CA (deploy/make_certs.sh) signs one EC key and certificate per
// client.
template <auto Free>
struct Deleter {
  void operator()(auto* p) const { Free(p); }
};
using KeyPtr = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using CertPtr = std::unique_ptr<X509, Deleter<X509_free>>;

std::string Pem(auto write, auto* object) {
  std::unique_ptr<BIO, Deleter<BIO_free>> bio(BIO_new(BIO_s_mem()));
  write(bio.get(), object);
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

struct Identity {
  std::string cert, key;  // PEM
};

Identity MakeClientCert(const std::string& name, X509* ca, EVP_PKEY* ca_key, long serial) {
  KeyPtr key(EVP_EC_gen("P-256"));
  CertPtr cert(X509_new());
  X509_set_version(cert.get(), 2);
  ASN1_INTEGER_set(X509_get_serialNumber(cert.get()), serial);
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 7 * 24 * 3600);
  X509_NAME* subject = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(subject, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(name.c_str()), -1, -1, 0);
  X509_set_issuer_name(cert.get(), X509_get_subject_name(ca));
  X509_set_pubkey(cert.get(), key.get());
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, ca, cert.get(), nullptr, nullptr, 0);
  std::unique_ptr<X509_EXTENSION, Deleter<X509_EXTENSION_free>> eku(
      X509V3_EXT_conf_nid(nullptr, &ctx, NID_ext_key_usage, "clientAuth"));
  X509_add_ext(cert.get(), eku.get(), -1);
  X509_sign(cert.get(), ca_key, EVP_sha256());
  return {Pem([](BIO* b, X509* x) { PEM_write_bio_X509(b, x); }, cert.get()),
          Pem(
              [](BIO* b, EVP_PKEY* k) {
                PEM_write_bio_PrivateKey(b, k, nullptr, nullptr, 0, nullptr, nullptr);
              },
              key.get())};
}

// ---- The coordinator's process: CPU seconds and RSS from /proc (common/base/proc_stats.h).
using fedlora::common::CpuSeconds;
double StatusMb(pid_t pid, std::string_view field) {
  return fedlora::common::StatusBytes(field, pid) / (1024.0 * 1024.0);
}
double PeakRssMb(pid_t pid) { return StatusMb(pid, "VmHWM:"); }

// Runs functions a second after they are handed over, on one thread (the clients' retries).
class Later {
 public:
  Later() : thread_([this] { Loop(); }) {}
  ~Later() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  void Add(std::function<void()> f) {
    std::lock_guard<std::mutex> lock(mu_);
    queue_.push_back({Clock::now() + std::chrono::seconds(1), std::move(f)});
    cv_.notify_one();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    while (!stop_) {
      if (queue_.empty()) {
        cv_.wait(lock);
        continue;
      }
      if (Clock::now() < queue_.front().first) {
        cv_.wait_until(lock, queue_.front().first);
        continue;
      }
      auto f = std::move(queue_.front().second);
      queue_.pop_front();
      lock.unlock();
      f();
      lock.lock();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<Clock::time_point, std::function<void()>>> queue_;
  bool stop_ = false;
  std::thread thread_;
};

// ---- One simulated client: a chain of callback calls, each issued from the previous one's
// completion.
struct Run {
  std::shared_ptr<const v1::JoinRequest> join;
  std::string update;  // the bytes every client uploads (its sha256 below)
  std::string update_sha256;
  int64_t chunk_bytes = 1 << 20;
  int64_t poll_ms = 0;  // Options::poll_ms
  std::atomic<int> done{0}, failed{0}, joined{0};
  std::atomic<int64_t> bytes_down{0}, bytes_up{0}, retries{0};
  // Secure aggregation: the protocol's messages (tasks' configs and steps down, requests up).
  std::atomic<int64_t> secagg_down{0}, secagg_up{0};
  std::shared_ptr<const fedlora::secagg::PeerVerifier> verifier;
  Later later;
};

class Client {
 public:
  Client(std::shared_ptr<grpc::Channel> channel, Run* run, const Identity* identity,
         std::string name)
      : stub_(v1::Coordinator::NewStub(std::move(channel))),
        run_(run),
        identity_(identity),
        name_(std::move(name)) {}
  void Start() { Join(); }

 private:
  // Every call has a deadline, as fedlora-client's have: under load a call can stall, and one
  // that never returns would hold its client (and the round, which waits for the whole cohort).
  grpc::ClientContext* Fresh(int deadline_s = 120) {
    context_ = std::make_unique<grpc::ClientContext>();
    context_->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(deadline_s));
    if (!session_.empty()) context_->AddMetadata(fedlora::common::kSessionMetadata, session_);
    return context_.get();
  }
  // A transient failure is retried after a second; anything else ends this client.
  bool Failed(const grpc::Status& s, const std::function<void()>& retry) {
    if (s.ok()) return false;
    if (s.error_code() == grpc::StatusCode::UNAVAILABLE ||
        s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED ||
        s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED) {
      run_->retries++;
      run_->later.Add(retry);
    } else {
      std::fprintf(stderr, "client failed: %s\n", s.error_message().c_str());
      run_->failed++;
    }
    return true;
  }
  void Join() {
    stub_->async()->Join(Fresh(), run_->join.get(), &join_response_, [this](grpc::Status s) {
      if (Failed(s, [this] { Join(); })) return;
      session_ = join_response_.session();
      run_->joined++;
      Poll();
    });
  }
  void Poll() {
    poll_.set_have_version(have_version_);
    poll_.set_max_wait_ms(run_->poll_ms);
    grpc::ClientContext* c = Fresh(static_cast<int>(run_->poll_ms / 1000) + 30);
    stub_->async()->GetTask(c, &poll_, &task_, [this](grpc::Status s) {
      if (Failed(s, [this] { Poll(); })) return;
      if (task_.kind() == v1::Task::WAIT) return Poll();
      if (task_.kind() == v1::Task::DONE) {
        run_->done++;
        return;
      }
      if (task_.kind() == v1::Task::SECAGG) return SecureStep();
      next_blob_ = 0;
      Download();
    });
  }
  // A protocol failure ends this client (and shows in `failed`).
  bool Broken(const absl::Status& st) {
    if (st.ok()) return false;
    std::fprintf(stderr, "%s: secure aggregation failed: %s\n", name_.c_str(),
                 std::string(st.message()).c_str());
    run_->failed++;
    return true;
  }
  // After "training": a fixed change (small values) quantised, and the keys advertised.
  void Advertise() {
    const v1::SecAggConfig& c = task_.secagg_config();
    run_->secagg_down += static_cast<int64_t>(c.ByteSizeLong());
    std::mt19937 rng(static_cast<uint32_t>(std::hash<std::string>()(name_)));
    std::normal_distribution<double> normal(0.0, 0.01);
    std::vector<double> input(static_cast<size_t>(c.length()));
    for (double& x : input) x = normal(rng);
    auto encoded = fedlora::secagg::Encode(input, c);
    if (Broken(encoded.status())) return;
    words_ = std::move(encoded->words);
    auto signer = fedlora::secagg::Signer::FromPem(identity_->key);
    if (Broken(signer.status())) return;
    auto session =
        fedlora::secagg::ClientSession::Create(c, name_, *std::move(signer), *run_->verifier);
    if (Broken(session.status())) return;
    session_secagg_.emplace(*std::move(session));
    auto keys = session_secagg_->AdvertiseKeys();
    if (Broken(keys.status())) return;
    request_.Clear();
    *request_.mutable_keys() = *std::move(keys);
    Send(c.instance());
  }
  void SecureStep() {
    const v1::SecAggStep& step = task_.secagg();
    run_->secagg_down += static_cast<int64_t>(step.ByteSizeLong());
    request_.Clear();
    fedlora::secagg::ClientSession& session = *session_secagg_;
    switch (step.step_case()) {
      case v1::SecAggStep::kRoster: {
        auto shares = session.ShareKeys(step.roster());
        if (Broken(shares.status())) return;
        *request_.mutable_shares() = *std::move(shares);
        return Send(step.instance());
      }
      case v1::SecAggStep::kInbox: {
        auto masked = session.MaskInput(step.inbox(), words_);
        if (Broken(masked.status())) return;
        masked_ = fedlora::secagg::PackWords(*masked, session.instance().config().bits());
        masked_sha256_ = fedlora::common::Sha256Hex(masked_);
        task_ = train_task_;  // the upload answers the training task
        offset_ = 0;
        return Upload();
      }
      case v1::SecAggStep::kSurvivors: {
        auto consent = session.Consent(step.survivors());
        if (Broken(consent.status())) return;
        *request_.mutable_consent() = *std::move(consent);
        return Send(step.instance());
      }
      case v1::SecAggStep::kConsents: {
        auto reveal = session.Unmask(step.consents());
        if (Broken(reveal.status())) return;
        *request_.mutable_reveal() = *std::move(reveal);
        return Send(step.instance());
      }
      default:
        Broken(absl::InvalidArgumentError("a secure aggregation task without a step"));
    }
  }
  void Send(const std::string& instance) {
    request_.set_round(task_.round());
    request_.set_instance(instance);
    run_->secagg_up += static_cast<int64_t>(request_.ByteSizeLong());
    stub_->async()->SecAgg(Fresh(), &request_, &secagg_response_, [this](grpc::Status s) {
      if (Failed(s, [this] { Send(request_.instance()); })) return;
      Poll();
    });
  }
  // The task's blobs this client lacks, one chunk at a time; then the update.
  void Download() {
    while (next_blob_ < task_.downloads_size() &&
           have_.contains(task_.downloads(next_blob_).sha256()))
      ++next_blob_;
    if (next_blob_ == task_.downloads_size()) {
      have_version_ = task_.state_version();
      offset_ = 0;
      if (task_.has_secagg_config()) {
        train_task_ = task_;
        return Advertise();
      }
      masked_.clear();
      return Upload();
    }
    const v1::BlobRef& blob = task_.downloads(next_blob_);
    download_.set_sha256(blob.sha256());
    download_.set_offset(static_cast<int64_t>(data_.size()));
    download_.set_max_bytes(run_->chunk_bytes);
    stub_->async()->Download(Fresh(), &download_, &chunk_, [this](grpc::Status s) {
      if (Failed(s, [this] { Download(); })) return;
      data_ += chunk_.data();
      run_->bytes_down += static_cast<int64_t>(chunk_.data().size());
      chunk_.Clear();  // 10,000 clients' last chunks would otherwise stay in memory
      const v1::BlobRef& blob = task_.downloads(next_blob_);
      if (static_cast<int64_t>(data_.size()) >= blob.size()) {
        if (fedlora::common::Sha256Hex(data_) != blob.sha256()) {
          std::fprintf(stderr, "blob %s failed verification\n", blob.sha256().c_str());
          run_->failed++;
          return;
        }
        have_.insert(blob.sha256());
        std::string().swap(data_);
      }
      Download();
    });
  }
  void Upload() {
    const bool masked = !masked_.empty();
    const std::string& bytes = masked ? masked_ : run_->update;
    upload_.Clear();
    upload_.set_round(task_.round());
    upload_.set_state_version(task_.state_version());
    upload_.set_sha256(masked ? masked_sha256_ : run_->update_sha256);
    upload_.set_total_size(static_cast<int64_t>(bytes.size()));
    upload_.set_num_examples(run_->join->num_examples());
    upload_.set_offset(offset_);
    const int64_t n =
        std::min<int64_t>(run_->chunk_bytes, static_cast<int64_t>(bytes.size()) - offset_);
    upload_.set_data(bytes.substr(static_cast<size_t>(offset_), static_cast<size_t>(n)));
    stub_->async()->Upload(Fresh(), &upload_, &uploaded_, [this, n](grpc::Status s) {
      if (Failed(s, [this] { Upload(); })) return;
      run_->bytes_up += n;
      offset_ += n;
      if (offset_ < static_cast<int64_t>((masked_.empty() ? run_->update : masked_).size()))
        return Upload();
      Poll();
    });
  }

  std::unique_ptr<v1::Coordinator::Stub> stub_;
  Run* run_;
  const Identity* identity_;
  std::string name_;
  std::unique_ptr<grpc::ClientContext> context_;
  // Secure aggregation.
  std::optional<fedlora::secagg::ClientSession> session_secagg_;
  std::vector<uint64_t> words_;
  std::string masked_, masked_sha256_;
  v1::Task train_task_;
  v1::SecAggRequest request_;
  v1::SecAggResponse secagg_response_;
  std::string session_;
  v1::JoinResponse join_response_;
  v1::GetTaskRequest poll_;
  v1::Task task_;
  int64_t have_version_ = -1;
  std::set<std::string> have_;
  int next_blob_ = 0;
  v1::DownloadRequest download_;
  v1::DownloadResponse chunk_;
  std::string data_;
  v1::UploadRequest upload_;
  v1::UploadResponse uploaded_;
  int64_t offset_ = 0;
};

// The update every client sends, in the run's encoding: LoRA factors (fedit) or R alone (fed-sb),
// of small random values at the task's scaling.
std::string MakeUpdate(const Options& o, const v1::JoinRequest& join) {
  const bool fed_sb = o.method == "fed-sb";
  std::vector<fedlora::common::ModuleShape> shapes;
  for (const v1::ModuleSpec& m : join.modules())
    shapes.push_back({m.name(), o.rank, m.in_features(), m.out_features(), 2.0, fed_sb});
  auto update = fedlora::common::Adapter::Create(shapes);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 0.01f);
  for (float& x : update->values()) x = normal(rng);
  return fedlora::common::EncodeAdapter(*update, fed_sb ? fedlora::common::AdapterParts::kROnly
                                                        : fedlora::common::AdapterParts::kAll);
}

// Once every client has joined and is long-polling: the coordinator's RSS, then `o.scrapes`
// scrapes of /metrics and of /api/run, each timed, with the coordinator's CPU seconds per scrape.
int Idle(const Options& o, pid_t server, Run& run) {
  while (run.joined + run.failed < o.clients)
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  std::this_thread::sleep_for(std::chrono::seconds(3));  // settled: polls parked, nothing in flight
  std::printf("idle: %d clients joined, %d failed; coordinator RSS %.1f MB (peak %.1f MB)\n",
              run.joined.load(), run.failed.load(), StatusMb(server, "VmRSS:"), PeakRssMb(server));
  if (o.scrapes > 0) {
    const int port =
        std::stoi(fedlora::testing::WaitForFile(o.work / "metrics.port", std::chrono::seconds(10)));
    std::this_thread::sleep_for(std::chrono::seconds(2));  // the status, published once a second
    httplib::Client http("127.0.0.1", port);
    for (const char* path : {"/metrics", "/api/run"}) {
      size_t bytes = 0;
      const double cpu = CpuSeconds(server);
      const auto start = Clock::now();
      for (int i = 0; i < o.scrapes; ++i) {
        const auto res = http.Get(path);
        if (!res || res->status != 200) {
          std::fprintf(stderr, "scrape of %s failed\n", path);
          std::_Exit(1);
        }
        bytes = res->body.size();
      }
      const double wall = std::chrono::duration<double>(Clock::now() - start).count();
      std::printf("%s: %d scrapes of %zu bytes, %.3f ms each, coordinator CPU %.3f ms each\n", path,
                  o.scrapes, bytes, 1e3 * wall / o.scrapes,
                  1e3 * (CpuSeconds(server) - cpu) / o.scrapes);
    }
    std::printf("after the scrapes: coordinator RSS %.1f MB\n", StatusMb(server, "VmRSS:"));
  }
  std::fflush(stdout);
  kill(server, SIGTERM);
  fedlora::testing::Wait(server, std::chrono::seconds(30));
  std::_Exit(run.failed > 0 ? 1 : 0);  // the channels' threads are not joined
}

int Main(const Options& o) {
  rlimit files{};
  getrlimit(RLIMIT_NOFILE, &files);
  files.rlim_cur = files.rlim_max;  // a connection per client, on both ends
  setrlimit(RLIMIT_NOFILE, &files);
  if (files.rlim_cur < static_cast<rlim_t>(o.clients) + 256) {
    std::fprintf(stderr, "%d clients need %d open files; the limit is %llu\n", o.clients,
                 o.clients + 256, static_cast<unsigned long long>(files.rlim_cur));
    return 2;
  }
  fs::remove_all(o.work);
  fs::create_directories(o.work);
  const fs::path certs = o.work / "certs";
  if (std::system(
          StrCat("bash ", o.source, "/deploy/make_certs.sh ", certs.string(), " 0 > /dev/null")
              .c_str()) != 0)
    return 1;
  const std::string ca_pem = *fedlora::common::ReadFileToString(certs / "ca.pem");
  std::unique_ptr<BIO, Deleter<BIO_free>> ca_bio(BIO_new_file((certs / "ca.pem").c_str(), "r")),
      key_bio(BIO_new_file((certs / "ca.key").c_str(), "r"));
  CertPtr ca(PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr));
  KeyPtr ca_key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, nullptr, nullptr));

  auto join = std::make_shared<v1::JoinRequest>();
  join->set_base_model_sha256(std::string(64, 'a'));
  join->set_num_examples(100);
  join->set_max_rank(1 << 16);
  for (int l = 0; l < o.layers; ++l) {
    for (const char* proj : {"q_proj", "v_proj"}) {
      v1::ModuleSpec* m = join->add_modules();
      m->set_name(StrCat("model.layers.", l, ".self_attn.", proj));
      m->set_in_features(o.features);
      m->set_out_features(o.features);
    }
  }
  Run run;
  run.join = join;
  run.update = MakeUpdate(o, *join);
  run.update_sha256 = fedlora::common::Sha256Hex(run.update);
  run.poll_ms = o.poll_ms;
  if (o.secure)
    run.verifier = std::make_shared<const fedlora::secagg::PeerVerifier>(
        *fedlora::secagg::PeerVerifier::FromCaPem(ca_pem));

  const auto certs_start = Clock::now();
  std::vector<Identity> identities;
  for (int i = 1; i <= o.clients; ++i)
    identities.push_back(MakeClientCert(StrCat("load-", i), ca.get(), ca_key.get(), 1000 + i));
  const double certs_s = std::chrono::duration<double>(Clock::now() - certs_start).count();

  const fs::path port_file = o.work / "port";
  const std::vector<std::string> argv = {
      o.bin + "/fedlora-server",
      "--method",
      o.method,
      "--rounds",
      std::to_string(o.rounds),
      "--min-clients",
      std::to_string(o.idle ? o.clients + 1 : o.clients),
      "--rank",
      std::to_string(o.rank),
      "--lora-alpha",
      std::to_string(2 * o.rank),
      "--fed-sb-init",
      "random",
      "--state-dir",
      (o.work / "state").string(),
      "--listen",
      "127.0.0.1:0",
      "--port-file",
      port_file.string(),
      "--tls-cert",
      (certs / "server.pem").string(),
      "--tls-key",
      (certs / "server.key").string(),
      "--client-ca",
      (certs / "ca.pem").string(),
      "--round-deadline-s",
      "3600",
      "--client-timeout-s",
      "600",
      "--max-wait-ms",
      std::to_string(o.poll_ms),
      "--linger-s",
      "5",
      "--max-update-bytes",
      std::to_string(2 * (2 * o.layers) * (2 * o.features * o.rank) * 4 +
                     (1 << 20))};  // LoRA's, x2
  std::vector<std::string> server_argv = argv;
  // The generator does every client's cryptography on this machine's 2 cores: at 3,000 clients a
  // protocol step takes it about a minute, past the coordinator's default step timeout.
  if (o.secure)
    for (const char* flag : {"--secure-aggregation", "secagg+", "--secagg-step-timeout-s", "3600"})
      server_argv.push_back(flag);
  if (o.scrapes > 0) {
    for (const std::string& flag :
         {std::string("--metrics-listen"), std::string("127.0.0.1:0"),
          std::string("--metrics-port-file"), (o.work / "metrics.port").string()})
      server_argv.push_back(flag);
  }
  const pid_t server = fedlora::testing::Start(server_argv, o.work / "server.log");
  std::string port = fedlora::testing::WaitForFile(port_file, std::chrono::seconds(20));
  while (!port.empty() && port.back() == '\n') port.pop_back();
  if (port.empty()) {
    std::fprintf(stderr, "the coordinator did not start; see %s\n",
                 (o.work / "server.log").c_str());
    return 1;
  }

  const auto start = Clock::now();
  const double cpu_start = CpuSeconds(server);
  std::vector<std::unique_ptr<Client>> clients;
  for (size_t i = 0; i < identities.size(); ++i) {
    const Identity& id = identities[i];
    grpc::SslCredentialsOptions tls;
    tls.pem_root_certs = ca_pem;
    tls.pem_cert_chain = id.cert;
    tls.pem_private_key = id.key;
    grpc::ChannelArguments args;
    for (const auto& [key, value] : fedlora::common::TransportChannelArgs(run.chunk_bytes))
      args.SetInt(key, value);
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // a connection of its own
    clients.push_back(std::make_unique<Client>(
        grpc::CreateCustomChannel("localhost:" + port, grpc::SslCredentials(tls), args), &run, &id,
        StrCat("load-", i + 1)));
    clients.back()->Start();
  }
  std::printf(
      "load_bench: %d %s clients%s, %d rounds, %d modules of %dx%d at rank %d; update %zu bytes;"
      " %lld ms long polls (%d client certificates made in %.1f s)\n",
      o.clients, o.method.c_str(), o.secure ? " under secure aggregation" : "", o.rounds,
      2 * o.layers, o.features, o.features, o.rank, run.update.size(),
      static_cast<long long>(o.poll_ms), o.clients, certs_s);
  if (o.idle) return Idle(o, server, run);
  std::printf("%-8s %12s %14s %14s\n", "round", "wall (s)", "server CPU (s)", "server RSS (MB)");
  const fs::path metrics = o.work / "state" / "metrics.jsonl";
  size_t closed = 0;
  auto last = start;
  double last_cpu = cpu_start;
  while (run.done + run.failed < o.clients) {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    const auto text = fedlora::common::ReadFileToString(metrics);
    const size_t lines =
        text.ok() ? static_cast<size_t>(std::count(text->begin(), text->end(), '\n')) : 0;
    for (; closed < lines; ++closed) {
      const auto now = Clock::now();
      const double cpu = CpuSeconds(server);
      std::printf("%-8zu %12.2f %14.2f %14.0f\n", closed + 1,
                  std::chrono::duration<double>(now - last).count(), cpu - last_cpu,
                  PeakRssMb(server));
      std::fflush(stdout);
      last = now;
      last_cpu = cpu;
    }
    std::ifstream stat(StrCat("/proc/", server, "/stat"));
    std::string pid_field, name, state;
    if (!(stat >> pid_field >> name >> state) || state == "Z") break;  // the coordinator exited
  }
  const double total_s = std::chrono::duration<double>(Clock::now() - start).count();
  const double peak = PeakRssMb(server);
  const double cpu = CpuSeconds(server) - cpu_start;
  rusage self{};
  getrusage(RUSAGE_SELF, &self);
  std::printf(
      "total: %.1f s, server CPU %.1f s, server peak RSS %.0f MB; %d done, %d failed; "
      "%.1f MB down, %.1f MB up, %lld retried calls; load generator CPU %.1f s, peak RSS %.0f MB\n",
      total_s, cpu, peak, run.done.load(), run.failed.load(),
      (run.bytes_down + run.secagg_down) / 1e6, (run.bytes_up + run.secagg_up) / 1e6,
      static_cast<long long>(run.retries.load()),
      static_cast<double>(self.ru_utime.tv_sec + self.ru_stime.tv_sec),
      static_cast<double>(self.ru_maxrss) / 1024);
  const double per_round = static_cast<double>(o.clients) * o.rounds;
  std::printf(
      "per client per round: %.1f kB up (%.1f kB of it protocol messages), %.1f kB down (%.1f kB "
      "protocol); server CPU %.2f s per round\n",
      (run.bytes_up + run.secagg_up) / per_round / 1e3, run.secagg_up / per_round / 1e3,
      (run.bytes_down + run.secagg_down) / per_round / 1e3, run.secagg_down / per_round / 1e3,
      cpu / o.rounds);
  fedlora::testing::Wait(server, std::chrono::seconds(30));
  std::fflush(stdout);
  std::_Exit(run.failed > 0 ? 1 : 0);  // the channels' threads are not joined
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"load_bench: the coordinator under many mutual-TLS clients from one process"};
  app.add_option("--clients", o.clients)->capture_default_str();
  app.add_option("--method", o.method)
      ->check(CLI::IsMember({"fedit", "fed-sb"}))
      ->capture_default_str();
  app.add_option("--rounds", o.rounds)->capture_default_str();
  app.add_option("--layers", o.layers, "q_proj and v_proj of each")->capture_default_str();
  app.add_option("--features", o.features, "each module is features x features")
      ->capture_default_str();
  app.add_option("--rank", o.rank)->capture_default_str();
  app.add_option("--poll-ms", o.poll_ms, "each client's long poll (fedlora-client: 5000)")
      ->capture_default_str();
  app.add_option("--work", o.work)->capture_default_str();
  app.add_flag("--idle", o.idle,
               "no round: measure the coordinator's RSS with every client connected and polling");
  app.add_option("--scrapes", o.scrapes,
                 "with --idle: time this many scrapes of /metrics and /api/run")
      ->capture_default_str();
  app.add_option("--bin", o.bin, "directory of the fedlora-server to load")->capture_default_str();
  app.add_flag("--secure-aggregation", o.secure,
               "the coordinator runs secagg+; every client runs its side of the protocol");
  CLI11_PARSE(app, argc, argv);
  return Main(o);
}
