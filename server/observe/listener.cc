#include "server/observe/listener.h"

#include <httplib.h>
#include <openssl/crypto.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <spdlog/spdlog.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <set>

#include "common/base/file_util.h"
#include "common/base/openssl_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/net/revocation.h"
#include "server/observe/page.h"

namespace fedlora::server {
namespace {

using common::StrCat;

// The verified client certificate of `ssl` in PEM, or "" when there is none.
std::string VerifiedPeerPem(const SSL* ssl) {
  if (ssl == nullptr || SSL_get_verify_result(ssl) != X509_V_OK) return "";
  const common::openssl::Cert cert(SSL_get1_peer_certificate(ssl));
  const common::openssl::Bio bio(BIO_new(BIO_s_mem()));
  if (!cert || !bio || PEM_write_bio_X509(bio.get(), cert.get()) != 1) return "";
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

std::array<unsigned char, SHA256_DIGEST_LENGTH> Digest(std::string_view text) {
  std::array<unsigned char, SHA256_DIGEST_LENGTH> d{};
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), d.data());
  return d;
}

// Who may read: anyone on this machine (loopback without a token), or an operator by
// certificate or token.
struct Access {
  bool open = true;
  std::string token;                        // "Authorization: Bearer <token>" admits
  MetricsListener::IsOperator is_operator;  // a verified operator's certificate admits (null: none)
  std::set<std::string> hosts;              // when open: the Host headers a request may carry

  bool Admits(const httplib::Request& req) const {
    // A web page the operator's browser visits could otherwise read a loopback listener through
    // a name of its own that resolves to 127.0.0.1 (DNS rebinding).
    if (open) return hosts.contains(req.get_header_value("Host"));
    // Digests compared in constant time: neither the token's bytes nor its length leak.
    if (!token.empty() &&
        CRYPTO_memcmp(Digest(req.get_header_value("Authorization")).data(),
                      Digest("Bearer " + token).data(), SHA256_DIGEST_LENGTH) == 0)
      return true;
    if (!is_operator) return false;
    const std::string pem = VerifiedPeerPem(req.ssl);
    return !pem.empty() && is_operator(pem);
  }
};

absl::StatusOr<Access> AccessOf(const ServerOptions& o, bool loopback,
                                MetricsListener::IsOperator is_operator) {
  Access access;
  if (!o.metrics_token_file.empty()) {
    ASSIGN_OR_RETURN(std::string token,
                     common::ReadFileToString(o.metrics_token_file, common::Symlinks::kFollow));
    while (!token.empty() && std::isspace(static_cast<unsigned char>(token.back())))
      token.pop_back();
    if (token.empty())
      return absl::InvalidArgumentError(StrCat("metrics_token_file ", o.metrics_token_file,
                                               " is empty; it must hold the bearer token"));
    access.token = std::move(token);
  }
  if (!loopback && !o.client_ca.empty()) {  // operators may come with a SIGHUP
    access.is_operator = is_operator
                             ? std::move(is_operator)
                             : [operators = std::set<std::string>(
                                    o.operators.begin(), o.operators.end())](std::string_view pem) {
                                 auto id = common::IdentifyCertificate(pem);
                                 return id.ok() && operators.contains(id->cn);
                               };
  }
  access.open = loopback && access.token.empty();
  return access;
}

// The TLS settings of a listener off the loopback interface: the coordinator's certificate, and
// client certificates of --client-ca asked for (required unless a token may be used instead).
bool SetUpTls(SSL_CTX& ctx, const ServerOptions& o, bool token) {
  static constexpr unsigned char kSessionContext[] = "fedlora-metrics";  // for resumed sessions
  if (SSL_CTX_set_min_proto_version(&ctx, TLS1_2_VERSION) != 1 ||
      SSL_CTX_set_session_id_context(&ctx, kSessionContext, sizeof(kSessionContext) - 1) != 1 ||
      SSL_CTX_use_certificate_chain_file(&ctx, o.tls_cert.c_str()) != 1 ||
      SSL_CTX_use_PrivateKey_file(&ctx, o.tls_key.c_str(), SSL_FILETYPE_PEM) != 1 ||
      SSL_CTX_check_private_key(&ctx) != 1)
    return false;
  if (!o.client_ca.empty()) {
    if (SSL_CTX_load_verify_locations(&ctx, o.client_ca.c_str(), nullptr) != 1) return false;
    SSL_CTX_set_verify(&ctx, SSL_VERIFY_PEER | (token ? 0 : SSL_VERIFY_FAIL_IF_NO_PEER_CERT),
                       nullptr);
  }
  return true;
}

// httplib's pool with a bounded queue: while `max_queued` connections wait for its threads, the
// accepting thread serves the next one itself, so it accepts no more until a thread is free and
// further connections wait in the kernel's backlog. (httplib's own queue has no bound: a flood of
// idle connections would grow it without end.)
class BoundedPool final : public httplib::TaskQueue {
 public:
  BoundedPool(size_t threads, size_t max_queued) : pool_(threads), max_queued_(max_queued) {}
  void enqueue(std::function<void()> fn) override {
    if (queued_.load() >= max_queued_) return fn();
    ++queued_;
    pool_.enqueue([this, fn = std::move(fn)] {
      --queued_;
      fn();
    });
  }
  void shutdown() override { pool_.shutdown(); }

 private:
  httplib::ThreadPool pool_;
  const size_t max_queued_;
  std::atomic<size_t> queued_{0};
};

}  // namespace

absl::StatusOr<std::unique_ptr<MetricsListener>> MetricsListener::Start(
    const ServerOptions& o, std::shared_ptr<const RunView> view, IsOperator is_operator) {
  ASSIGN_OR_RETURN(const HostPort at, ParseHostPort(o.metrics_listen, "metrics_listen"));
  const bool loopback = IsLoopback(at.host);
  ASSIGN_OR_RETURN(Access access, AccessOf(o, loopback, std::move(is_operator)));
  std::unique_ptr<MetricsListener> l(new MetricsListener());
  l->view_ = std::move(view);
  if (loopback) {
    l->http_ = std::make_unique<httplib::Server>();
  } else {
    const bool token = !access.token.empty();
    l->http_ =
        std::make_unique<httplib::SSLServer>([&](SSL_CTX& ctx) { return SetUpTls(ctx, o, token); });
    if (!l->http_->is_valid()) {
      return absl::InvalidArgumentError(
          StrCat("metrics_listen ", o.metrics_listen, ": cannot set up TLS with tls_cert ",
                 o.tls_cert, ", tls_key ", o.tls_key,
                 o.client_ca.empty() ? "" : StrCat(" and client_ca ", o.client_ca)));
    }
  }
  httplib::Server& http = *l->http_;
  // Requests are small GETs: a body past 4 KiB is refused, slow or idle connections do not hold
  // the threads for long, and at most 64 wait for one.
  http.new_task_queue = [] { return new BoundedPool(8, 64); };
  http.set_payload_max_length(4096);
  http.set_read_timeout(std::chrono::seconds(5));
  http.set_write_timeout(std::chrono::seconds(10));
  http.set_keep_alive_timeout(2);
  const RunView* v = l->view_.get();
  http.Get("/metrics", [v](const httplib::Request&, httplib::Response& res) {
    res.set_content(v->Prometheus(), "text/plain; version=0.0.4; charset=utf-8");
  });
  http.Get("/api/run", [v](const httplib::Request&, httplib::Response& res) {
    res.set_content(v->Page().dump(), "application/json");
  });
  for (const PageAsset& asset : PageAssets()) {
    http.Get(asset.path, [asset](const httplib::Request&, httplib::Response& res) {
      res.set_header("Content-Security-Policy",
                     "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                     "img-src 'self'; frame-ancestors 'none'");
      res.set_content(asset.content.data(), asset.content.size(), asset.type);
    });
  }
  l->port_ = at.port == 0 ? http.bind_to_any_port(at.host) : at.port;
  if (l->port_ < 0 || (at.port != 0 && !http.bind_to_port(at.host, at.port))) {
    return absl::UnavailableError(
        StrCat("cannot listen on ", o.metrics_listen, " (metrics_listen): ", std::strerror(errno)));
  }
  if (access.open) {
    const std::string host = at.host.find(':') == std::string::npos ? at.host : "[" + at.host + "]";
    for (const std::string& name :
         {std::string("127.0.0.1"), std::string("localhost"), std::string("[::1]"), host})
      access.hosts.insert(StrCat(name, ":", l->port_));
  }
  http.set_pre_routing_handler([access](const httplib::Request& req, httplib::Response& res) {
    res.set_header("Cache-Control", "no-store");
    res.set_header("X-Content-Type-Options", "nosniff");
    if (access.Admits(req)) return httplib::Server::HandlerResponse::Unhandled;
    res.status = 401;
    res.set_header("WWW-Authenticate", "Bearer");
    res.set_content("an operator's client certificate or bearer token is required\n", "text/plain");
    return httplib::Server::HandlerResponse::Handled;
  });
  l->thread_ = std::thread([&http, l = l.get()] {
    http.listen_after_bind();
    l->stopped_ = true;
  });
  spdlog::info("metrics and the live page on {}://{}:{}/ ({})", loopback ? "http" : "https",
               at.host, l->port_,
               access.open ? "anyone on this machine"
               : !access.token.empty() && access.is_operator
                   ? "operators' certificates or the bearer token"
               : access.token.empty() ? "operators' certificates"
                                      : "the bearer token");
  return l;
}

MetricsListener::~MetricsListener() {
  // A stop before the thread has begun to listen is not seen by it: stop until it has ended.
  while (thread_.joinable() && !stopped_) {
    http_->stop();
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (thread_.joinable()) thread_.join();
}

}  // namespace fedlora::server
