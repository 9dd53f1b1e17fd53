// Owning pointers to OpenSSL objects, the reason of its latest error, names and times as text.
#ifndef FEDLORA_COMMON_BASE_OPENSSL_UTIL_H_
#define FEDLORA_COMMON_BASE_OPENSSL_UTIL_H_

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/x509.h>

#include <ctime>
#include <memory>
#include <string>
#include <string_view>

namespace fedlora::common::openssl {

template <auto Free>
struct Deleter {
  void operator()(auto* p) const { Free(p); }
};
using Bio = std::unique_ptr<BIO, Deleter<BIO_free_all>>;
using Key = std::unique_ptr<EVP_PKEY, Deleter<EVP_PKEY_free>>;
using Cert = std::unique_ptr<X509, Deleter<X509_free>>;
using Crl = std::unique_ptr<X509_CRL, Deleter<X509_CRL_free>>;
using Request = std::unique_ptr<X509_REQ, Deleter<X509_REQ_free>>;

// `s`'s bytes as OpenSSL takes them.
inline const unsigned char* Bytes(std::string_view s) {
  return reinterpret_cast<const unsigned char*>(s.data());
}

// A read-only BIO over `text`, which must outlive it.
inline Bio MemoryBio(std::string_view text) {
  return Bio(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

// OpenSSL's reason for the oldest error queued on this thread, and the queue emptied ("" when
// there is none).
inline std::string LastError() {
  std::string reason;
  while (const unsigned long e = ERR_get_error()) {
    if (const char* r = ERR_reason_error_string(e); r != nullptr && reason.empty()) reason = r;
  }
  return reason;
}

// `t` in UTC by strftime's `format`; `unreadable` when OpenSSL cannot read it.
inline std::string FormatTime(const ASN1_TIME* t, const char* format, const char* unreadable) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(t, &tm) != 1) return unreadable;
  char out[64];
  return std::strftime(out, sizeof out, format, &tm) ? out : unreadable;
}

// "/CN=fedlora run CA": a name on one line.
inline std::string OneLine(const X509_NAME* name) {
  char buffer[512];
  return X509_NAME_oneline(name, buffer, sizeof buffer) ? buffer : "";
}

}  // namespace fedlora::common::openssl

#endif  // FEDLORA_COMMON_BASE_OPENSSL_UTIL_H_
