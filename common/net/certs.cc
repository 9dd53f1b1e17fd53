#include "common/net/certs.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>

#include <functional>
#include <memory>
#include <string>

#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

template <typename T, void (*Free)(T*)>
struct Deleter {
  void operator()(T* p) const { Free(p); }
};
using Key = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY, EVP_PKEY_free>>;
using Cert = std::unique_ptr<X509, Deleter<X509, X509_free>>;

absl::Status OpenSslError(const std::string& what) {
  return absl::InternalError(StrCat("OpenSSL could not ", what));
}

std::string Pem(const std::function<int(BIO*)>& write) {
  std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>> bio(BIO_new(BIO_s_mem()));
  if (!bio || write(bio.get()) != 1) return {};
  char* data = nullptr;
  const long n = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(n));
}

// A PEM object of `path`, read with `read` (PEM_read_bio_PrivateKey, PEM_read_bio_X509).
template <typename Ptr, typename Read>
absl::StatusOr<Ptr> ReadPem(const std::filesystem::path& path, Read read, const char* what) {
  ASSIGN_OR_RETURN(std::string pem, ReadFileToString(path));
  std::unique_ptr<BIO, Deleter<BIO, BIO_free_all>> bio(
      BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  Ptr object(read(bio.get(), nullptr, nullptr, nullptr));
  if (!object) return absl::InvalidArgumentError(StrCat(path.string(), " is not a PEM ", what));
  return object;
}

// A certificate for `key` named `cn`, signed by `issuer_key` (and named by `issuer`; self-signed
// when null), with the given extensions ("basicConstraints=CA:TRUE" etc.).
absl::StatusOr<Cert> Sign(EVP_PKEY* key, const std::string& cn, X509* issuer, EVP_PKEY* issuer_key,
                          const std::vector<std::pair<int, std::string>>& extensions) {
  Cert cert(X509_new());
  unsigned char serial[16];
  if (!cert || RAND_bytes(serial, sizeof serial) != 1) return OpenSslError("make a certificate");
  serial[0] &= 0x7f;  // positive
  std::unique_ptr<BIGNUM, Deleter<BIGNUM, BN_free>> bn(BN_bin2bn(serial, sizeof serial, nullptr));
  X509_set_version(cert.get(), 2);
  BN_to_ASN1_INTEGER(bn.get(), X509_get_serialNumber(cert.get()));
  X509_gmtime_adj(X509_getm_notBefore(cert.get()), -3600);
  X509_gmtime_adj(X509_getm_notAfter(cert.get()), 825L * 24 * 3600);
  X509_set_pubkey(cert.get(), key);
  X509_NAME* name = X509_get_subject_name(cert.get());
  X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                             reinterpret_cast<const unsigned char*>(cn.c_str()), -1, -1, 0);
  X509_set_issuer_name(cert.get(), issuer ? X509_get_subject_name(issuer) : name);
  X509V3_CTX ctx;
  X509V3_set_ctx(&ctx, issuer ? issuer : cert.get(), cert.get(), nullptr, nullptr, 0);
  for (const auto& [nid, value] : extensions) {
    std::unique_ptr<X509_EXTENSION, Deleter<X509_EXTENSION, X509_EXTENSION_free>> ext(
        X509V3_EXT_conf_nid(nullptr, &ctx, nid, value.c_str()));
    if (!ext || X509_add_ext(cert.get(), ext.get(), -1) != 1)
      return OpenSslError(StrCat("add the extension ", value));
  }
  if (X509_sign(cert.get(), issuer_key, EVP_sha256()) == 0) return OpenSslError("sign");
  return cert;
}

// Writes <name>.key and <name>.pem unless <name>.pem exists.
absl::Status Issue(const std::filesystem::path& dir, const std::string& name, const std::string& cn,
                   X509* ca, EVP_PKEY* ca_key,
                   const std::vector<std::pair<int, std::string>>& extensions) {
  if (std::filesystem::exists(dir / (name + ".pem"))) return absl::OkStatus();
  Key key(EVP_EC_gen("P-256"));
  if (!key) return OpenSslError("make a P-256 key");
  ASSIGN_OR_RETURN(Cert cert, Sign(key.get(), cn, ca, ca_key ? ca_key : key.get(), extensions));
  const std::string key_pem = Pem([&](BIO* b) {
    return PEM_write_bio_PrivateKey(b, key.get(), nullptr, nullptr, 0, nullptr, nullptr);
  });
  const std::string cert_pem = Pem([&](BIO* b) { return PEM_write_bio_X509(b, cert.get()); });
  RETURN_IF_ERROR(WriteFileAtomically(dir / (name + ".key"), key_pem));
  std::filesystem::permissions(dir / (name + ".key"), std::filesystem::perms::owner_read |
                                                          std::filesystem::perms::owner_write);
  return WriteFileAtomically(dir / (name + ".pem"), cert_pem);
}

}  // namespace

absl::Status MakeRunCertificates(const std::filesystem::path& dir, int clients) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(StrCat("cannot create ", dir.string(), ": ", ec.message()));
  // The directory is the owner's alone, so no key is readable by others even while it is written.
  std::filesystem::permissions(dir, std::filesystem::perms::owner_all, ec);
  if (ec) return absl::InternalError(StrCat("cannot restrict ", dir.string(), ": ", ec.message()));
  RETURN_IF_ERROR(Issue(dir, "ca", "fedlora run CA", nullptr, nullptr,
                        {{NID_basic_constraints, "critical,CA:TRUE"},
                         {NID_key_usage, "critical,keyCertSign,cRLSign"},
                         {NID_subject_key_identifier, "hash"}}));
  ASSIGN_OR_RETURN(Cert ca, ReadPem<Cert>(dir / "ca.pem", PEM_read_bio_X509, "certificate"));
  ASSIGN_OR_RETURN(Key ca_key,
                   ReadPem<Key>(dir / "ca.key", PEM_read_bio_PrivateKey, "private key"));
  RETURN_IF_ERROR(Issue(dir, "server", "coordinator", ca.get(), ca_key.get(),
                        {{NID_subject_alt_name, "DNS:localhost,IP:127.0.0.1,DNS:coordinator"},
                         {NID_ext_key_usage, "serverAuth"}}));
  for (int k = 1; k <= clients; ++k) {
    const std::string name = StrCat("client-", k);
    RETURN_IF_ERROR(
        Issue(dir, name, name, ca.get(), ca_key.get(), {{NID_ext_key_usage, "clientAuth"}}));
  }
  return absl::OkStatus();
}

}  // namespace fedlora::common
