#include "common/net/certs.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <fmt/format.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cctype>
#include <ctime>
#include <functional>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <utility>

#include "common/base/file_util.h"
#include "common/base/openssl_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

namespace fs = std::filesystem;
using openssl::Cert;
using openssl::Key;
using Extensions = std::vector<std::pair<int, std::string>>;

absl::Status OpenSslError(const std::string& what) {
  return absl::InternalError(StrCat("OpenSSL could not ", what, ": ", openssl::LastError()));
}

absl::StatusOr<std::string> Pem(const std::function<int(BIO*)>& write, const char* what) {
  openssl::Bio bio(BIO_new(BIO_s_mem()));
  if (!bio || write(bio.get()) != 1) return OpenSslError(StrCat("write the ", what, " as PEM"));
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

// A PEM object of `path`, read with `read` (PEM_read_bio_PrivateKey, PEM_read_bio_X509).
template <typename Ptr, typename Read>
absl::StatusOr<Ptr> ReadPem(const fs::path& path, Read read, const char* what) {
  ASSIGN_OR_RETURN(std::string pem, ReadFileToString(path));
  openssl::Bio bio = openssl::MemoryBio(pem);
  Ptr object(read(bio.get(), nullptr, nullptr, nullptr));
  if (!object) return absl::InvalidArgumentError(StrCat(path.string(), " is not a PEM ", what));
  return object;
}

// A certificate for `key` named `cn`, signed by `issuer_key` (and named by `issuer`; self-signed
// when null), valid for `days`, with the given extensions ("basicConstraints=CA:TRUE" etc.).
absl::StatusOr<Cert> Sign(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key,
                          const Extensions& extensions, int days = 825) {
  Cert cert(X509_new());
  unsigned char serial[16];
  if (!cert || RAND_bytes(serial, sizeof serial) != 1) return OpenSslError("make a certificate");
  serial[0] &= 0x7f;  // positive
  std::unique_ptr<BIGNUM, openssl::Deleter<BN_free>> bn(BN_bin2bn(serial, sizeof serial, nullptr));
  X509_set_version(cert.get(), 2);
  BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get()));
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), days * 24L * 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer ? issuer : cert.get(), cert.get(), nullptr, nullptr, 0);
  for (const auto& [nid, value] : extensions) {
    std::unique_ptr<X509_EXTENSION, openssl::Deleter<X509_EXTENSION_free>> ext(
        X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
    if (!ext || X509_add_ext(cert.get(), ext.get(), -1) != 1)
      return OpenSslError(StrCat("add the extension ", value));
  }
  if (X509_sign(cert.get(), issuer_key, EVP_sha256()) == 0) return OpenSslError("sign");
  return cert;
}

// Writes a private key to `path` atomically: its file is created under umask 077, and made the
// owner's alone before the first byte (a temporary file someone else planted fails here).
absl::Status WriteKey(const fs::path& path, EVP_PKEY* key) {
  ASSIGN_OR_RETURN(const std::string pem, Pem(
                                              [&](BIO* b) {
                                                return PEM_write_bio_PrivateKey(
                                                    b, key, nullptr, nullptr, 0, nullptr, nullptr);
                                              },
                                              "private key"));
  struct Umask {
    const mode_t was = umask(077);
    ~Umask() { umask(was); }
  } restrict_new_files;
  return WriteFileAtomically(path, [&](std::FILE* f) -> absl::Status {
    if (fchmod(fileno(f), S_IRUSR | S_IWUSR) != 0)
      return absl::InternalError(StrCat("cannot restrict ", path.string(), " to its owner"));
    if (std::fwrite(pem.data(), 1, pem.size(), f) != pem.size())
      return absl::InternalError(StrCat("cannot write ", path.string()));
    return absl::OkStatus();
  });
}

absl::Status WriteCert(const fs::path& path, X509* cert) {
  ASSIGN_OR_RETURN(const std::string pem,
                   Pem([&](BIO* b) { return PEM_write_bio_X509(b, cert); }, "certificate"));
  return WriteFileAtomically(path, pem);
}

// Writes <name>.key and <name>.pem unless <name>.pem exists.
absl::Status Issue(const fs::path& dir, const std::string& name, const std::string& cn, X509* ca,
                   EVP_PKEY* ca_key, const Extensions& extensions, int days = 825) {
  if (fs::exists(dir / (name + ".pem"))) return absl::OkStatus();
  Key key(EVP_EC_gen("P-256"));
  if (!key) return OpenSslError("make a P-256 key");
  ASSIGN_OR_RETURN(Cert cert,
                   Sign(key.get(), cn, ca, ca_key ? ca_key : key.get(), extensions, days));
  RETURN_IF_ERROR(WriteKey(dir / (name + ".key"), key.get()));
  return WriteCert(dir / (name + ".pem"), cert.get());
}

// `dir`, created mode 0700 if missing (one that exists keeps its mode).
absl::Status CreatePrivateDirectory(const fs::path& dir) {
  std::error_code ec;
  if (fs::is_directory(dir, ec)) return absl::OkStatus();
  fs::create_directories(dir, ec);
  if (!ec) fs::permissions(dir, fs::perms::owner_all, ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", dir.string(), ": ", ec.message()));
  return absl::OkStatus();
}

const Extensions kCaExtensions = {{NID_basic_constraints, "critical,CA:TRUE"},
                                  {NID_key_usage, "critical,keyCertSign,cRLSign"},
                                  {NID_subject_key_identifier, "hash"}};

// What a certificate of a client (no `alt` names) or of the coordinator (its DNS names and IP
// addresses) carries: nothing of what its request asked for.
absl::StatusOr<Extensions> LeafExtensions(const std::vector<std::string>& server_names) {
  Extensions e = {{NID_basic_constraints, "critical,CA:FALSE"},
                  {NID_key_usage, "critical,digitalSignature"},
                  {NID_subject_key_identifier, "hash"},
                  {NID_authority_key_identifier, "keyid:always"},
                  {NID_ext_key_usage, server_names.empty() ? "clientAuth" : "serverAuth"}};
  if (server_names.empty()) return e;
  std::vector<std::string> alt;
  for (const std::string& name : server_names) {
    unsigned char ip[16];
    const bool is_ip =
        inet_pton(AF_INET, name.c_str(), ip) == 1 || inet_pton(AF_INET6, name.c_str(), ip) == 1;
    if (!is_ip && (name.empty() || name.size() > 253 ||
                   name.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                                          "0123456789.-*") != std::string::npos))
      return absl::InvalidArgumentError(
          StrCat("server name '", name.substr(0, 80), "': expected a DNS name or an IP address"));
    alt.push_back(StrCat(is_ip ? "IP:" : "DNS:", name));
  }
  e.emplace_back(NID_subject_alt_name, StrJoin(alt, ","));
  return e;
}

struct CaKeys {
  Cert ca;
  Key key;
};
absl::StatusOr<CaKeys> LoadCa(const fs::path& dir) {
  CaKeys c;
  ASSIGN_OR_RETURN(c.ca, ReadPem<Cert>(dir / "ca.pem", PEM_read_bio_X509, "certificate"));
  ASSIGN_OR_RETURN(c.key, ReadPem<Key>(dir / "ca.key", PEM_read_bio_PrivateKey, "private key"));
  return c;
}

// A CA directory, locked (flock on its .lock file) while this is open, and what it signed:
// issued.json, {"certificates": [{cn, serial, sha256, not_after, revoked, revoked_at}]},
// rewritten atomically after each signature and revocation.
struct Authority {
  fs::path dir;
  CaKeys keys;
  nlohmann::json issued;
  int lock = -1;

  Authority() = default;
  Authority(Authority&& o) noexcept
      : dir(std::move(o.dir)),
        keys(std::move(o.keys)),
        issued(std::move(o.issued)),
        lock(std::exchange(o.lock, -1)) {}
  ~Authority() {
    if (lock >= 0) close(lock);
  }

  static absl::StatusOr<Authority> Open(const fs::path& dir) {
    Authority a;
    a.dir = dir;
    a.lock = open((dir / ".lock").c_str(), O_RDWR | O_CREAT | O_CLOEXEC | O_NOFOLLOW, 0600);
    if (a.lock < 0 || flock(a.lock, LOCK_EX) != 0)
      return absl::FailedPreconditionError(StrCat("cannot lock the CA directory ", dir.string(),
                                                  " (is it one `fedlora certs init` made?)"));
    ASSIGN_OR_RETURN(a.keys, LoadCa(dir));
    ASSIGN_OR_RETURN(const std::string text, ReadFileToString(dir / "issued.json"));
    a.issued = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    bool ok = a.issued.is_object() && a.issued["certificates"].is_array();
    for (const nlohmann::json& c : ok ? a.issued["certificates"] : nlohmann::json::array()) {
      ok = ok && c.is_object() && c.value("cn", nlohmann::json()).is_string() &&
           c.value("serial", nlohmann::json()).is_string() &&
           c.value("revoked", nlohmann::json()).is_boolean() &&
           c.value("not_after", nlohmann::json("")).is_string();
    }
    if (!ok) {
      return absl::InvalidArgumentError(
          StrCat((dir / "issued.json").string(),
                 " is not the record `fedlora certs` keeps (certificates: cn, serial, revoked)"));
    }
    return a;
  }
  absl::Status Save() const {
    return WriteFileAtomically(dir / "issued.json", issued.dump(2) + "\n");
  }
};

// "00a1B" → "0A1B": a serial as OpenSSL writes it (upper case, whole bytes), as the coordinator
// and issued.json have it; "" when `hex` is not hex.
std::string NormalSerial(const std::string& hex) {
  BIGNUM* bn = nullptr;
  if (hex.empty() || hex.find_first_not_of("0123456789abcdefABCDEF") != std::string::npos ||
      BN_hex2bn(&bn, hex.c_str()) != static_cast<int>(hex.size()))
    return "";
  std::unique_ptr<BIGNUM, openssl::Deleter<BN_free>> owned(bn);
  char* out = BN_bn2hex(bn);
  std::string normal = out ? out : "";
  OPENSSL_free(out);
  return normal;
}

// The directory `dir` names, without a trailing slash ("ca/" → "ca").
fs::path DirectoryName(const fs::path& dir) {
  fs::path p = dir.lexically_normal();
  return p.has_filename() ? p : p.parent_path();
}

}  // namespace

absl::Status CheckCommonName(const std::string& cn) {
  const bool ok = !cn.empty() && cn.size() <= 64 && cn[0] != '.' && cn[0] != '-' &&
                  cn.find_first_not_of(
                      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                      "0123456789._-") == std::string::npos;
  if (ok) return absl::OkStatus();
  return absl::InvalidArgumentError(
      StrCat("common name '", cn.substr(0, 80),
             "': expected 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -"));
}

absl::Status MakeRunCertificates(const fs::path& dir, int clients) {
  RETURN_IF_ERROR(CreatePrivateDirectory(dir));
  RETURN_IF_ERROR(Issue(dir, "ca", "fedlora run CA", nullptr, nullptr, kCaExtensions));
  ASSIGN_OR_RETURN(CaKeys ca, LoadCa(dir));
  ASSIGN_OR_RETURN(const Extensions server,
                   LeafExtensions({"localhost", "127.0.0.1", "coordinator"}));
  ASSIGN_OR_RETURN(const Extensions client, LeafExtensions({}));
  RETURN_IF_ERROR(Issue(dir, "server", "coordinator", ca.ca.get(), ca.key.get(), server));
  for (int k = 1; k <= clients; ++k) {
    const std::string name = StrCat("client-", k);
    RETURN_IF_ERROR(Issue(dir, name, name, ca.ca.get(), ca.key.get(), client));
  }
  return absl::OkStatus();
}

absl::Status InitAuthority(const fs::path& given, const std::vector<std::string>& server_names,
                           int days) {
  if (days < 1 || days > 3650)
    return absl::InvalidArgumentError(StrCat("--days ", days, ": expected 1 to 3650"));
  ASSIGN_OR_RETURN(const Extensions server, LeafExtensions(server_names));
  const fs::path dir = DirectoryName(given);
  if (fs::exists(dir)) {
    return absl::AlreadyExistsError(
        StrCat(dir.string(),
               " exists: certs init makes a new directory (a second CA there would "
               "orphan every certificate the first one signed)"));
  }
  unsigned char id[4];
  if (RAND_bytes(id, sizeof id) != 1) return OpenSslError("draw the CA's name");
  // Each CA its own name: during a rotation the client CA file may hold two.
  const std::string name =
      StrCat("fedlora CA ", fmt::format("{:02x}{:02x}{:02x}{:02x}", id[0], id[1], id[2], id[3]));
  return BuildDirectoryAtomically(dir, /*overwrite=*/false, [&](const fs::path& tmp) {
    std::error_code ec;
    fs::permissions(tmp, fs::perms::owner_all, ec);
    if (ec)
      return absl::InternalError(StrCat("cannot restrict ", tmp.string(), ": ", ec.message()));
    RETURN_IF_ERROR(Issue(tmp, "ca", name, nullptr, nullptr, kCaExtensions, 3650));
    if (!server_names.empty()) {
      ASSIGN_OR_RETURN(CaKeys ca, LoadCa(tmp));
      RETURN_IF_ERROR(Issue(tmp, "server", "coordinator", ca.ca.get(), ca.key.get(), server, days));
    }
    return WriteFileAtomically(tmp / "issued.json", "{\"certificates\": []}\n");
  });
}

absl::Status RequestCertificate(const fs::path& dir, const std::string& cn) {
  RETURN_IF_ERROR(CheckCommonName(cn));
  for (const char* ext : {".key", ".csr"}) {
    if (fs::exists(dir / (cn + ext)))
      return absl::AlreadyExistsError(
          StrCat((dir / (cn + ext)).string(), " exists; it is not replaced"));
  }
  RETURN_IF_ERROR(CreatePrivateDirectory(dir));
  Key key(EVP_EC_gen("P-256"));
  openssl::Request request(X509_REQ_new());
  if (!key || !request) return OpenSslError("make a key and a request");
  X509_REQ_set_version(request.get(), 0);
  X509_NAME* name = X509_REQ_get_subject_name(request.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  if (X509_REQ_set_pubkey(request.get(), key.get()) != 1 ||
      X509_REQ_sign(request.get(), key.get(), EVP_sha256()) == 0)
    return OpenSslError("sign the request");
  ASSIGN_OR_RETURN(
      const std::string csr,
      Pem([&](BIO* b) { return PEM_write_bio_X509_REQ(b, request.get()); }, "request"));
  RETURN_IF_ERROR(WriteKey(dir / (cn + ".key"), key.get()));
  if (absl::Status st = WriteFileAtomically(dir / (cn + ".csr"), csr); !st.ok()) {
    std::error_code ec;
    fs::remove(dir / (cn + ".key"), ec);  // neither, so that the request can be made again
    return st;
  }
  return absl::OkStatus();
}

absl::StatusOr<CertificateId> SignRequest(const fs::path& ca_dir, const fs::path& csr_file,
                                          const fs::path& out, const SignOptions& options) {
  if (options.days < 1 || options.days > 3650)
    return absl::InvalidArgumentError(StrCat("--days ", options.days, ": expected 1 to 3650"));
  ASSIGN_OR_RETURN(const Extensions extensions, LeafExtensions(options.server_names));
  ASSIGN_OR_RETURN(Authority authority, Authority::Open(ca_dir));
  ASSIGN_OR_RETURN(
      openssl::Request request,
      ReadPem<openssl::Request>(csr_file, PEM_read_bio_X509_REQ, "certificate signing request"));
  EVP_PKEY* key = X509_REQ_get0_pubkey(request.get());
  if (key == nullptr || X509_REQ_verify(request.get(), key) != 1) {
    return absl::InvalidArgumentError(
        StrCat(csr_file.string(),
               ": the request's signature does not verify with its key (a damaged or altered "
               "request); ask the site for a new one"));
  }
  char cn_buffer[256] = "";
  if (X509_NAME_get_text_by_NID(X509_REQ_get_subject_name(request.get()), NID_commonName, cn_buffer,
                                sizeof cn_buffer) < 0)
    return absl::InvalidArgumentError(StrCat(csr_file.string(), ": the request names no CN"));
  const std::string cn = cn_buffer;
  RETURN_IF_ERROR(CheckCommonName(cn));
  const auto list = [](const std::set<std::string>& names) {
    return names.empty() ? std::string("none")
                         : StrJoin(std::vector<std::string>(names.begin(), names.end()), ",");
  };
  if (!options.server_names.empty()) {
    // The coordinator's: its DNS names are the operator's, not the request's; its common name
    // must not be one a client or an operator has.
    if (options.as_operator)
      return absl::InvalidArgumentError("--server-name and --operator: a certificate is one kind");
    if (options.clients.contains(cn) || options.operators.contains(cn)) {
      return absl::PermissionDeniedError(
          StrCat("'", cn,
                 "' is a client's or an operator's name; the coordinator's request needs its own "
                 "(e.g. --cn coordinator)"));
    }
  } else if (options.operators.contains(cn) != options.as_operator) {
    return absl::PermissionDeniedError(
        options.as_operator
            ? StrCat("'", cn, "' is not on the operator list (", list(options.operators), ")")
            : StrCat("'", cn,
                     "' is an operator's name: an operator may act on the run; sign it with "
                     "--operator if that is meant"));
  } else if (!options.as_operator && !options.clients.contains(cn)) {
    return absl::PermissionDeniedError(StrCat("'", cn, "' is not on the allow-list (",
                                              list(options.clients),
                                              "); add it to the coordinator's config first"));
  }
  for (const nlohmann::json& c : authority.issued["certificates"]) {
    if (c["cn"] == cn && !c["revoked"].get<bool>() && !options.reissue) {
      return absl::AlreadyExistsError(StrCat(
          "'", cn, "' holds certificate ", c["serial"].get<std::string>(), " (valid until ",
          c.value("not_after", "?"),
          "); to rotate it, sign with --reissue, then revoke the old one (fedlora certs revoke)"));
    }
  }
  ASSIGN_OR_RETURN(Cert cert, Sign(key, cn, authority.keys.ca.get(), authority.keys.key.get(),
                                   extensions, options.days));
  ASSIGN_OR_RETURN(const std::string pem,
                   Pem([&](BIO* b) { return PEM_write_bio_X509(b, cert.get()); }, "certificate"));
  ASSIGN_OR_RETURN(CertificateId id, IdentifyCertificate(pem));
  authority.issued["certificates"].push_back(
      {{"cn", cn},
       {"serial", id.serial},
       {"sha256", id.sha256},
       {"kind", !options.server_names.empty() ? "server"
                : options.as_operator         ? "operator"
                                              : "client"},
       {"not_after",
        openssl::FormatTime(X509_get0_notAfter(cert.get()), "%Y-%m-%dT%H:%M:%SZ", "?")},
       {"revoked", false}});
  // The record first: a certificate that exists is always in it.
  RETURN_IF_ERROR(authority.Save());
  RETURN_IF_ERROR(WriteFileAtomically(out, pem));
  return id;
}

absl::StatusOr<std::vector<std::string>> Revoke(const fs::path& ca_dir, const std::string& cn,
                                                const std::string& given_serial) {
  const std::string serial = given_serial.empty() ? "" : NormalSerial(given_serial);
  if (!given_serial.empty() && serial.empty())
    return absl::InvalidArgumentError(
        StrCat("--serial ", given_serial.substr(0, 80), ": expected hexadecimal digits"));
  ASSIGN_OR_RETURN(Authority authority, Authority::Open(ca_dir));
  std::vector<std::string> now;
  for (nlohmann::json& c : authority.issued["certificates"]) {
    if (c["cn"] != cn || c["revoked"].get<bool>()) continue;
    if (!serial.empty() && c["serial"] != serial) continue;
    c["revoked"] = true;
    c["revoked_at"] = static_cast<int64_t>(std::time(nullptr));
    now.push_back(c["serial"]);
  }
  // The record first, then the CRL, written anew from it at every call: a revocation recorded is
  // in the CRL once a call succeeds.
  if (!now.empty()) RETURN_IF_ERROR(authority.Save());
  openssl::Crl crl(X509_CRL_new());
  if (!crl || X509_CRL_set_version(crl.get(), 1) != 1 ||
      X509_CRL_set_issuer_name(crl.get(), X509_get_subject_name(authority.keys.ca.get())) != 1)
    return OpenSslError("make a CRL");
  std::unique_ptr<ASN1_TIME, openssl::Deleter<ASN1_TIME_free>> last(X509_gmtime_adj(nullptr, 0)),
      next(X509_gmtime_adj(nullptr, 365L * 24 * 3600));
  X509_CRL_set1_lastUpdate(crl.get(), last.get());
  X509_CRL_set1_nextUpdate(crl.get(), next.get());
  for (const nlohmann::json& c : authority.issued["certificates"]) {
    if (!c["revoked"].get<bool>()) continue;
    BIGNUM* bn = nullptr;
    const std::string hex = c["serial"];
    if (BN_hex2bn(&bn, hex.c_str()) == 0) return OpenSslError(StrCat("read serial ", hex));
    std::unique_ptr<BIGNUM, openssl::Deleter<BN_free>> owned(bn);
    std::unique_ptr<ASN1_INTEGER, openssl::Deleter<ASN1_INTEGER_free>> number(
        BN_to_ASN1_INTEGER(bn, nullptr));
    std::unique_ptr<ASN1_TIME, openssl::Deleter<ASN1_TIME_free>> when(
        ASN1_TIME_set(nullptr, c.value("revoked_at", int64_t{0})));
    X509_REVOKED* r = X509_REVOKED_new();
    if (r == nullptr || !number || !when || X509_REVOKED_set_serialNumber(r, number.get()) != 1 ||
        X509_REVOKED_set_revocationDate(r, when.get()) != 1 ||
        X509_CRL_add0_revoked(crl.get(), r) != 1) {
      X509_REVOKED_free(r);
      return OpenSslError("list a revoked certificate");
    }
  }
  X509_CRL_sort(crl.get());
  if (X509_CRL_sign(crl.get(), authority.keys.key.get(), EVP_sha256()) == 0)
    return OpenSslError("sign the CRL");
  ASSIGN_OR_RETURN(const std::string pem,
                   Pem([&](BIO* b) { return PEM_write_bio_X509_CRL(b, crl.get()); }, "CRL"));
  RETURN_IF_ERROR(WriteFileAtomically(ca_dir / "crl.pem", pem));
  if (now.empty()) {
    return absl::NotFoundError(StrCat(
        "no certificate of '", cn, "'", serial.empty() ? "" : StrCat(" with serial ", serial),
        " that is not revoked already (", (ca_dir / "issued.json").string(),
        " lists what was issued); ", (ca_dir / "crl.pem").string(), " was written again"));
  }
  return now;
}

}  // namespace fedlora::common
