#include "common/net/tls.h"

#include <fcntl.h>
#include <netdb.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <ctime>

#include "common/base/file_util.h"
#include "common/base/openssl_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

absl::StatusOr<std::string> ReadPem(const std::string& path, std::string_view what) {
  auto text = ReadFileToString(path);
  if (!text.ok())
    return absl::InvalidArgumentError(
        StrCat("cannot read the ", what, " ", path, ": ", text.status().message()));
  if (text->find("-----BEGIN ") == std::string::npos) {
    return absl::InvalidArgumentError(StrCat(path, " is not a PEM file (expected the ", what, ")"));
  }
  return text;
}

using openssl::Deleter;
using SslCtxPtr = std::unique_ptr<SSL_CTX, Deleter<SSL_CTX_free>>;
using SslPtr = std::unique_ptr<SSL, Deleter<SSL_free>>;

struct Socket {
  int fd = -1;
  ~Socket() {
    if (fd >= 0) close(fd);
  }
};

std::string FormatTime(const ASN1_TIME* t) {
  return openssl::FormatTime(t, "%Y-%m-%d %H:%M:%S UTC", "an unreadable time");
}

// A blocking TCP connection to `address` (host:port, [v6]:port), reads and writes bounded by
// `timeout`; UNAVAILABLE when none can be made within it.
absl::Status Connect(const std::string& address, std::chrono::milliseconds timeout, Socket* out,
                     std::string* host) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size())
    return absl::UnavailableError(StrCat("'", address, "' is not host:port"));
  *host = address.substr(0, colon);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']')
    *host = host->substr(1, host->size() - 2);
  addrinfo hints{};
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(host->c_str(), address.c_str() + colon + 1, &hints, &found))
    return absl::UnavailableError(StrCat("cannot resolve ", address, ": ", gai_strerror(rc)));
  std::unique_ptr<addrinfo, Deleter<freeaddrinfo>> list(found);
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    Socket s{socket(a->ai_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, a->ai_protocol)};
    if (s.fd < 0) continue;
    if (connect(s.fd, a->ai_addr, a->ai_addrlen) != 0) {
      pollfd p{s.fd, POLLOUT, 0};
      int error = 0;
      socklen_t len = sizeof error;
      if (errno != EINPROGRESS || poll(&p, 1, static_cast<int>(timeout.count())) != 1 ||
          getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &error, &len) != 0 || error != 0)
        continue;
    }
    const timeval tv{static_cast<time_t>(timeout.count() / 1000),
                     static_cast<suseconds_t>(timeout.count() % 1000 * 1000)};
    if (fcntl(s.fd, F_SETFL, 0) != 0 || setsockopt(s.fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) ||
        setsockopt(s.fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv))
      continue;
    std::swap(out->fd, s.fd);
    return absl::OkStatus();
  }
  return absl::UnavailableError(StrCat("no connection to ", address));
}

// FAILED_PRECONDITION when the first certificate of `pem` (read from `path`, the `what`) is expired
// or not yet valid: no retry can change that.
absl::Status CheckDates(const std::string& pem, const std::string& path, std::string_view what) {
  std::unique_ptr<BIO, Deleter<BIO_free>> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  std::unique_ptr<X509, Deleter<X509_free>> cert(
      bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!cert) {
    return absl::InvalidArgumentError(StrCat("cannot read the ", what, " ", path,
                                             " as a PEM certificate: ", openssl::LastError()));
  }
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) < 0) {
    return absl::FailedPreconditionError(StrCat("the ", what, " ", path, " expired on ",
                                                FormatTime(X509_get0_notAfter(cert.get())),
                                                "; it needs a new certificate"));
  }
  if (X509_cmp_current_time(X509_get0_notBefore(cert.get())) > 0) {
    return absl::FailedPreconditionError(StrCat("the ", what, " ", path, " is not valid before ",
                                                FormatTime(X509_get0_notBefore(cert.get())),
                                                " (is this machine's clock right?)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ProbeTlsRefusal(const std::string& address, const std::string& ca_file,
                             const std::string& cert_file, const std::string& key_file,
                             std::chrono::milliseconds timeout) {
  ERR_clear_error();
  SslCtxPtr ctx(SSL_CTX_new(TLS_client_method()));
  if (!ctx || SSL_CTX_load_verify_locations(ctx.get(), ca_file.c_str(), nullptr) != 1 ||
      (!cert_file.empty() &&
       (SSL_CTX_use_certificate_chain_file(ctx.get(), cert_file.c_str()) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx.get(), key_file.c_str(), SSL_FILETYPE_PEM) != 1))) {
    return absl::UnavailableError(StrCat("cannot load the TLS files: ", openssl::LastError()));
  }
  SSL_CTX_set_verify(ctx.get(), SSL_VERIFY_PEER, nullptr);
  static constexpr unsigned char kAlpn[] = {2, 'h', '2'};  // gRPC servers require HTTP/2
  SSL_CTX_set_alpn_protos(ctx.get(), kAlpn, sizeof kAlpn);
  Socket socket;
  std::string host;
  RETURN_IF_ERROR(Connect(address, timeout, &socket, &host));
  SslPtr ssl(SSL_new(ctx.get()));
  SSL_set_fd(ssl.get(), socket.fd);
  SSL_set_tlsext_host_name(ssl.get(), host.c_str());
  // TLS 1.3 completes the client's side before the server has checked its certificate: a refusal
  // comes as an alert on the first read. An accepted client reads the server's HTTP/2 settings, or
  // nothing until the timeout.
  char buffer[64];
  int rc = SSL_connect(ssl.get());
  const bool handshake_done = rc == 1;
  if (handshake_done) rc = SSL_read(ssl.get(), buffer, sizeof buffer);
  if (rc > 0) return absl::OkStatus();
  const int error = SSL_get_error(ssl.get(), rc);
  const int saved_errno = errno;
  std::string reason = openssl::LastError();
  if (const long verify = SSL_get_verify_result(ssl.get()); verify != X509_V_OK) {
    return absl::PermissionDeniedError(StrCat("the coordinator's certificate is not trusted by ",
                                              ca_file, ": ",
                                              X509_verify_cert_error_string(verify)));
  }
  if (handshake_done && error == SSL_ERROR_SYSCALL &&
      (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK))
    return absl::OkStatus();  // accepted: the server waits for our HTTP/2 preface
  // gRPC's server checks the client's certificate after the client's side of a TLS 1.3 handshake
  // is done, and closes the connection without an alert when it refuses it: an end of stream right
  // after the handshake, before the server's HTTP/2 settings, is that refusal.
  if (handshake_done && (error == SSL_ERROR_ZERO_RETURN || error == SSL_ERROR_SYSCALL ||
                         reason == "unexpected eof while reading")) {
    return absl::PermissionDeniedError(StrCat(
        "the coordinator closed the connection right after the TLS handshake: it does not accept ",
        cert_file.empty() ? "a client without a certificate (--cert, --key)"
                          : StrCat("this client's certificate ", cert_file,
                                   " (signed by another CA than its client CA, or expired by its "
                                   "clock)")));
  }
  if (error == SSL_ERROR_SSL && !reason.empty())
    return absl::PermissionDeniedError(
        StrCat("the coordinator refuses the TLS handshake: ", reason));
  return absl::UnavailableError(StrCat("the TLS connection to ", address, " closed"));
}

void KeepOpenSslUntilExit() { OPENSSL_init_crypto(OPENSSL_INIT_NO_ATEXIT, nullptr); }

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerTlsCredentials(
    const std::string& cert_file, const std::string& key_file, const std::string& client_ca_file) {
  grpc::SslServerCredentialsOptions options(
      client_ca_file.empty() ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                             : GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  ASSIGN_OR_RETURN(std::string cert, ReadPem(cert_file, "server certificate"));
  RETURN_IF_ERROR(CheckDates(cert, cert_file, "server certificate"));
  ASSIGN_OR_RETURN(std::string key, ReadPem(key_file, "server private key"));
  options.pem_key_cert_pairs.push_back({key, cert});
  if (!client_ca_file.empty()) {
    ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem(client_ca_file, "client CA certificate"));
  }
  return grpc::SslServerCredentials(options);
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ClientTlsCredentials(
    const std::string& ca_file, const std::string& cert_file, const std::string& key_file) {
  grpc::SslCredentialsOptions options;
  ASSIGN_OR_RETURN(options.pem_root_certs, ReadPem(ca_file, "CA certificate"));
  if (!cert_file.empty()) {
    ASSIGN_OR_RETURN(options.pem_cert_chain, ReadPem(cert_file, "client certificate"));
    RETURN_IF_ERROR(CheckDates(options.pem_cert_chain, cert_file, "client certificate"));
    ASSIGN_OR_RETURN(options.pem_private_key, ReadPem(key_file, "client private key"));
  }
  return grpc::SslCredentials(options);
}

}  // namespace fedlora::common
