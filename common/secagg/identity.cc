#include "common/secagg/identity.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>
#include <openssl/x509v3.h>

#include "common/base/file_util.h"
#include "common/base/openssl_util.h"
#include "common/base/strings.h"

namespace fedlora::secagg {
namespace {

using common::openssl::Bytes;

using common::StrCat;
namespace ossl = common::openssl;
using MdCtx = std::unique_ptr<EVP_MD_CTX, ossl::Deleter<EVP_MD_CTX_free>>;
using StoreCtx = std::unique_ptr<X509_STORE_CTX, ossl::Deleter<X509_STORE_CTX_free>>;

// SHA-256, except for the keys that hash internally.
const EVP_MD* DigestFor(EVP_PKEY* key) {
  const int id = EVP_PKEY_get_id(key);
  return id == EVP_PKEY_ED25519 || id == EVP_PKEY_ED448 ? nullptr : EVP_sha256();
}

std::string CommonName(X509* cert) {
  char name[256] = {};
  const int n =
      X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, name, sizeof name);
  return n > 0 ? std::string(name, static_cast<size_t>(n)) : std::string();
}

}  // namespace

std::string SignedBytes(std::initializer_list<std::string_view> parts) {
  std::string out;
  for (std::string_view p : parts) {
    uint64_t n = p.size();
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>(n >> (8 * i) & 0xff));
    out.append(p);
  }
  return out;
}

struct Signer::Key {
  ossl::Key key;
};

absl::StatusOr<Signer> Signer::FromPemFile(const std::string& key_file) {
  auto pem = common::ReadFileToString(key_file);
  if (!pem.ok()) return pem.status();
  auto signer = FromPem(*pem);
  if (!signer.ok())
    return absl::InvalidArgumentError(StrCat(key_file, ": ", signer.status().message()));
  return signer;
}

absl::StatusOr<Signer> Signer::FromPem(std::string_view key_pem) {
  ossl::Bio bio = ossl::MemoryBio(key_pem);
  ossl::Key key(PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr));
  if (!key)
    return absl::InvalidArgumentError(StrCat("expected a PEM private key: ", ossl::LastError()));
  return Signer(std::make_shared<const Key>(Key{std::move(key)}));
}

absl::StatusOr<std::string> Signer::Sign(std::string_view message) const {
  MdCtx ctx(EVP_MD_CTX_new());
  size_t size = 0;
  if (!ctx ||
      EVP_DigestSignInit(ctx.get(), nullptr, DigestFor(key_->key.get()), nullptr,
                         key_->key.get()) != 1 ||
      EVP_DigestSign(ctx.get(), nullptr, &size, Bytes(message), message.size()) != 1)
    return absl::InternalError(StrCat("OpenSSL could not sign: ", ossl::LastError()));
  std::string signature(size, '\0');
  if (EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(signature.data()), &size,
                     Bytes(message), message.size()) != 1)
    return absl::InternalError(StrCat("OpenSSL could not sign: ", ossl::LastError()));
  signature.resize(size);
  return signature;
}

struct PeerVerifier::Store {
  std::unique_ptr<X509_STORE, ossl::Deleter<X509_STORE_free>> store;
};

absl::StatusOr<PeerVerifier> PeerVerifier::FromCaPem(std::string_view ca_pem) {
  auto store = std::make_shared<Store>();
  store->store.reset(X509_STORE_new());
  ossl::Bio bio = ossl::MemoryBio(ca_pem);
  int count = 0;
  while (ossl::Cert cert{PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)}) {
    if (X509_STORE_add_cert(store->store.get(), cert.get()) != 1)
      return absl::InvalidArgumentError(
          StrCat("cannot trust a CA certificate: ", ossl::LastError()));
    ++count;
  }
  ossl::LastError();  // the end of the PEM text
  if (count == 0) return absl::InvalidArgumentError("expected one or more PEM CA certificates");
  return PeerVerifier(std::move(store));
}

absl::Status PeerVerifier::Verify(std::string_view client, std::string_view certificate,
                                  std::string_view message, std::string_view signature) const {
  ossl::Bio bio = ossl::MemoryBio(certificate);
  ossl::Cert cert(PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr));
  if (!cert) {
    ossl::LastError();
    return absl::PermissionDeniedError(
        StrCat("the certificate relayed for ", client, " is not a PEM certificate"));
  }
  StoreCtx ctx(X509_STORE_CTX_new());
  // A client's certificate: the coordinator's own (serverAuth), signed by the same CA, is not one.
  if (!ctx || X509_STORE_CTX_init(ctx.get(), store_->store.get(), cert.get(), nullptr) != 1 ||
      X509_STORE_CTX_set_purpose(ctx.get(), X509_PURPOSE_SSL_CLIENT) != 1)
    return absl::InternalError("OpenSSL could not start a certificate check");
  if (X509_verify_cert(ctx.get()) != 1)
    return absl::PermissionDeniedError(
        StrCat("the certificate relayed for ", client, " does not verify against the CA: ",
               X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx.get()))));
  if (const std::string name = CommonName(cert.get()); name != client)
    return absl::PermissionDeniedError(
        StrCat("the certificate relayed for ", client, " names '", name, "'"));
  EVP_PKEY* key = X509_get0_pubkey(cert.get());
  MdCtx md(EVP_MD_CTX_new());
  if (!key || !md || EVP_DigestVerifyInit(md.get(), nullptr, DigestFor(key), nullptr, key) != 1 ||
      EVP_DigestVerify(md.get(), Bytes(signature), signature.size(), Bytes(message),
                       message.size()) != 1) {
    ossl::LastError();
    return absl::PermissionDeniedError(
        StrCat("the signature relayed for ", client, " is not ", client, "'s over this message"));
  }
  return absl::OkStatus();
}

}  // namespace fedlora::secagg
