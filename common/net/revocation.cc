#include "common/net/revocation.h"

#include <openssl/objects.h>
#include <openssl/pem.h>

#include "common/base/file_util.h"
#include "common/base/openssl_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

std::string SerialHex(const ASN1_INTEGER* serial) {
  std::unique_ptr<BIGNUM, openssl::Deleter<BN_free>> bn(ASN1_INTEGER_to_BN(serial, nullptr));
  char* hex = bn ? BN_bn2hex(bn.get()) : nullptr;
  std::string out = hex ? hex : "";
  OPENSSL_free(hex);
  return out;
}

std::string LowerHex(const unsigned char* bytes, unsigned int size) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < size; ++i) {
    out += kDigits[bytes[i] >> 4];
    out += kDigits[bytes[i] & 15];
  }
  return out;
}

// After a loop of PEM reads: OK when it stopped at the end of the text (no further PEM block),
// an error naming the `what` that could not be read otherwise (a damaged block must not end the
// list quietly: what follows it would be ignored).
absl::Status EndOfPem(const std::string& file, std::string_view what, int read) {
  const unsigned long e = ERR_peek_last_error();
  const bool clean =
      e == 0 || (ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE);
  const std::string reason = openssl::LastError();
  if (clean) return absl::OkStatus();
  return absl::InvalidArgumentError(StrCat(what, " ", read + 1, " of ", file, " cannot be read (",
                                           reason, "); the file is refused"));
}

}  // namespace

absl::StatusOr<CertificateId> IdentifyCertificate(std::string_view pem) {
  openssl::Bio bio = openssl::MemoryBio(pem);
  openssl::Cert cert(bio ? PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr) : nullptr);
  if (!cert) {
    return absl::InvalidArgumentError(StrCat("not a PEM certificate (", openssl::LastError(), ")"));
  }
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int size = 0;
  if (X509_digest(cert.get(), EVP_sha256(), digest, &size) != 1)
    return absl::InternalError("OpenSSL could not hash a certificate");
  // The common name whole, as gRPC reads it: one, without NUL bytes (a name that reads
  // differently cut at a NUL could pass for another).
  const X509_NAME* subject = X509_get_subject_name(cert.get());
  const int at = X509_NAME_get_index_by_NID(subject, NID_commonName, -1);
  std::string cn;
  if (at >= 0) {
    const ASN1_STRING* data = X509_NAME_ENTRY_get_data(X509_NAME_get_entry(subject, at));
    cn.assign(reinterpret_cast<const char*>(ASN1_STRING_get0_data(data)),
              static_cast<size_t>(ASN1_STRING_length(data)));
  }
  if (at >= 0 && (X509_NAME_get_index_by_NID(subject, NID_commonName, at) >= 0 ||
                  cn.find('\0') != std::string::npos))
    return absl::InvalidArgumentError("a certificate with several common names, or a NUL in one");
  return CertificateId{openssl::OneLine(X509_get_issuer_name(cert.get())),
                       SerialHex(X509_get0_serialNumber(cert.get())), LowerHex(digest, size), cn};
}

absl::StatusOr<std::shared_ptr<const RevocationList>> RevocationList::Load(
    const std::string& crl_file, std::string_view ca_pem, const std::string& ca_file,
    std::vector<std::string>* warnings) {
  auto text = ReadFileToString(crl_file);
  if (!text.ok())
    return absl::InvalidArgumentError(
        StrCat("cannot read the CRL file ", crl_file, ": ", text.status().message()));
  std::vector<openssl::Cert> cas;
  ERR_clear_error();
  openssl::Bio ca_bio = openssl::MemoryBio(ca_pem);
  while (X509* ca = PEM_read_bio_X509(ca_bio.get(), nullptr, nullptr, nullptr))
    cas.emplace_back(ca);
  RETURN_IF_ERROR(EndOfPem(ca_file, "certificate", static_cast<int>(cas.size())));
  if (cas.empty())
    return absl::InvalidArgumentError(StrCat("the client CA ", ca_file, " holds no certificate"));
  auto list = std::make_shared<RevocationList>();
  list->file_ = crl_file;
  openssl::Bio bio = openssl::MemoryBio(*text);
  int count = 0;
  while (openssl::Crl crl{PEM_read_bio_X509_CRL(bio.get(), nullptr, nullptr, nullptr)}) {
    ++count;
    const std::string issuer = openssl::OneLine(X509_CRL_get_issuer(crl.get()));
    const X509* signer = nullptr;
    for (const openssl::Cert& ca : cas) {
      if (X509_NAME_cmp(X509_get_subject_name(ca.get()), X509_CRL_get_issuer(crl.get())) == 0 &&
          X509_CRL_verify(crl.get(), X509_get0_pubkey(ca.get())) == 1)
        signer = ca.get();
    }
    if (signer == nullptr) {
      return absl::InvalidArgumentError(
          StrCat("CRL ", count, " of ", crl_file, " (issuer ", issuer,
                 ") is not signed by a CA certificate of the client CA ", ca_file,
                 "; a CRL must come from the CA that issued the certificates it revokes"));
    }
    if (const ASN1_TIME* next = X509_CRL_get0_nextUpdate(crl.get());
        next != nullptr && X509_cmp_current_time(next) < 0) {
      warnings->push_back(StrCat("CRL ", count, " of ", crl_file, " (issuer ", issuer,
                                 ") is past its next update: its CA should publish a new one; its "
                                 "revocations still count"));
    }
    const STACK_OF(X509_REVOKED)* revoked = X509_CRL_get_REVOKED(crl.get());
    for (int i = 0; i < sk_X509_REVOKED_num(revoked); ++i) {
      const X509_REVOKED* r = sk_X509_REVOKED_value(revoked, i);
      list->revoked_.insert(Key(issuer, SerialHex(X509_REVOKED_get0_serialNumber(r))));
    }
    ERR_clear_error();  // so that what ends the loop is the next read's
  }
  RETURN_IF_ERROR(EndOfPem(crl_file, "CRL", count));
  if (count == 0)
    return absl::InvalidArgumentError(
        StrCat(crl_file, " holds no PEM CRL (expected -----BEGIN X509 CRL-----)"));
  return list;
}

}  // namespace fedlora::common
