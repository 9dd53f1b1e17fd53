// The enrolment path of a federation (common/net/certs.h) and the coordinator's revocation check
// (common/net/revocation.h), checked against the openssl program as an independent reader.
#include "common/net/certs.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>

#include "common/base/file_util.h"
#include "common/net/revocation.h"
#include "tests/process.h"
#include "tests/scratch_dir.h"

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
using testing::ReadText;
using testing::RunProgram;
namespace fs = std::filesystem;

class CertsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(InitAuthority(dir_ / "ca", {"localhost", "127.0.0.1"}).ok());
  }
  // A site's request, signed: returns the certificate's path.
  fs::path Enrol(const std::string& cn, const std::string& site, bool reissue = false) {
    EXPECT_TRUE(RequestCertificate(dir_ / site, cn).ok());
    const fs::path out = dir_ / site / (cn + ".pem");
    auto id = SignRequest(dir_ / "ca", dir_ / site / (cn + ".csr"), out,
                          {.clients = {"site-a", "site-b"}, .reissue = reissue});
    EXPECT_TRUE(id.ok()) << id.status();
    return out;
  }
  // What `openssl x509` says of `cert` after the first '=' of its first line: "-serial" gives
  // the serial in hex, "-subject" "CN = name".
  static std::string OpenSsl(const fs::path& cert, const std::string& flag) {
    const auto r = RunProgram({"openssl", "x509", "-in", cert.string(), "-noout", flag});
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return r.output.substr(r.output.find('=') + 1, r.output.find('\n') - r.output.find('=') - 1);
  }
  testing::ScratchDir dir_;
};

TEST_F(CertsTest, ASignedRequestIsAClientCertificateOfTheCaAndTheKeyStaysWhereItWasMade) {
  const fs::path cert = Enrol("site-a", "site");
  const auto verify = RunProgram({"openssl", "verify", "-purpose", "sslclient", "-CAfile",
                                  (dir_ / "ca" / "ca.pem").string(), cert.string()});
  EXPECT_EQ(verify.exit_code, 0) << verify.output;
  EXPECT_EQ(OpenSsl(cert, "-subject"), "CN = site-a");
  // The server's certificate names what clients dial.
  const auto server = RunProgram({"openssl", "x509", "-in", (dir_ / "ca" / "server.pem").string(),
                                  "-noout", "-ext", "subjectAltName"});
  EXPECT_THAT(server.output, HasSubstr("DNS:localhost, IP Address:127.0.0.1"));
  struct stat st {};
  ASSERT_EQ(stat((dir_ / "site" / "site-a.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  ASSERT_EQ(stat((dir_ / "ca" / "ca.key").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0600u);
  // The certificate's key is the site's: it matches the key the request was made with.
  const auto a =
      RunProgram({"openssl", "pkey", "-in", (dir_ / "site" / "site-a.key").string(), "-pubout"});
  const auto b = RunProgram({"openssl", "x509", "-in", cert.string(), "-noout", "-pubkey"});
  EXPECT_EQ(a.output, b.output);
  // The coordinator names it as openssl does.
  auto id = IdentifyCertificate(ReadText(cert));
  ASSERT_TRUE(id.ok()) << id.status();
  EXPECT_EQ(id->serial, OpenSsl(cert, "-serial"));
  const auto sha =
      RunProgram({"openssl", "x509", "-in", cert.string(), "-noout", "-fingerprint", "-sha256"});
  std::string hex;
  for (char c : sha.output.substr(sha.output.find('=') + 1))
    if (std::isxdigit(static_cast<unsigned char>(c))) hex += static_cast<char>(std::tolower(c));
  EXPECT_EQ(id->sha256, hex);
}

TEST_F(CertsTest, SigningRefusesNamesOffTheListRepeatsAndAlteredRequests) {
  Enrol("site-a", "site");
  // Not on the list.
  ASSERT_TRUE(RequestCertificate(dir_ / "other", "site-z").ok());
  auto refused = SignRequest(dir_ / "ca", dir_ / "other" / "site-z.csr", dir_ / "z.pem",
                             {.clients = {"site-a", "site-b"}});
  EXPECT_TRUE(absl::IsPermissionDenied(refused.status())) << refused.status();
  EXPECT_THAT(refused.status().message(), HasSubstr("'site-z' is not on the allow-list"));
  EXPECT_FALSE(fs::exists(dir_ / "z.pem"));
  // Issued already: only with reissue.
  ASSERT_TRUE(RequestCertificate(dir_ / "again", "site-a").ok());
  refused = SignRequest(dir_ / "ca", dir_ / "again" / "site-a.csr", dir_ / "a2.pem",
                        {.clients = {"site-a"}});
  EXPECT_TRUE(absl::IsAlreadyExists(refused.status())) << refused.status();
  EXPECT_THAT(refused.status().message(), HasSubstr("--reissue"));
  EXPECT_TRUE(SignRequest(dir_ / "ca", dir_ / "again" / "site-a.csr", dir_ / "a2.pem",
                          {.clients = {"site-a"}, .reissue = true})
                  .ok());
  // An altered request: its signature no longer verifies (the last byte of the DER is the
  // signature's).
  ASSERT_TRUE(RequestCertificate(dir_ / "b", "site-b").ok());
  const std::string csr = (dir_ / "b" / "site-b.csr").string();
  ASSERT_EQ(
      RunProgram({"openssl", "req", "-in", csr, "-outform", "DER", "-out", csr + ".der"}).exit_code,
      0);
  std::string der = ReadText(csr + ".der");
  der.back() ^= 1;
  std::ofstream(csr + ".der", std::ios::binary) << der;
  ASSERT_EQ(
      RunProgram({"openssl", "req", "-inform", "DER", "-in", csr + ".der", "-out", csr}).exit_code,
      0);
  refused = SignRequest(dir_ / "ca", csr, dir_ / "b.pem", {.clients = {"site-b"}});
  EXPECT_TRUE(absl::IsInvalidArgument(refused.status())) << refused.status();
  EXPECT_THAT(refused.status().message(), HasSubstr("does not verify"));
  // Names that could not name a file or a ledger entry, and a second CA in one directory.
  EXPECT_FALSE(RequestCertificate(dir_ / "c", "../x").ok());
  EXPECT_FALSE(CheckCommonName("").ok());
  EXPECT_FALSE(CheckCommonName(std::string(65, 'a')).ok());
  EXPECT_TRUE(CheckCommonName("client-1").ok());
  EXPECT_TRUE(absl::IsAlreadyExists(InitAuthority(dir_ / "ca", {"localhost"})));
  // An operator's name is signed only when the operator says so, and only an operator's.
  ASSERT_TRUE(RequestCertificate(dir_ / "o", "ops").ok());
  refused = SignRequest(dir_ / "ca", dir_ / "o" / "ops.csr", dir_ / "o" / "ops.pem",
                        {.clients = {"site-a"}, .operators = {"ops"}});
  EXPECT_THAT(refused.status().message(), HasSubstr("'ops' is an operator's name"));
  refused = SignRequest(dir_ / "ca", dir_ / "other" / "site-z.csr", dir_ / "z.pem",
                        {.clients = {"site-z"}, .operators = {"ops"}, .as_operator = true});
  EXPECT_THAT(refused.status().message(), HasSubstr("'site-z' is not on the operator list"));
  auto signed_op = SignRequest(dir_ / "ca", dir_ / "o" / "ops.csr", dir_ / "o" / "ops.pem",
                               {.operators = {"ops"}, .as_operator = true});
  ASSERT_TRUE(signed_op.ok()) << signed_op.status();
  EXPECT_EQ(signed_op->cn, "ops");
}

// A request that asks to be a CA, for other names and for server authentication gets none of it:
// the certificate carries the CA's own choice (checked by openssl's reading of it).
TEST_F(CertsTest, WhatARequestAsksForBeyondItsKeyAndNameIsNotSigned) {
  const std::string key = (dir_ / "evil.key").string(), csr = (dir_ / "evil.csr").string();
  const auto made = RunProgram({"openssl",
                                "req",
                                "-new",
                                "-newkey",
                                "ec",
                                "-pkeyopt",
                                "ec_paramgen_curve:P-256",
                                "-nodes",
                                "-keyout",
                                key,
                                "-out",
                                csr,
                                "-subj",
                                "/CN=site-a/O=Evil Corp",
                                "-addext",
                                "basicConstraints=critical,CA:TRUE",
                                "-addext",
                                "subjectAltName=DNS:coordinator",
                                "-addext",
                                "extendedKeyUsage=serverAuth"});
  ASSERT_EQ(made.exit_code, 0) << made.output;
  const fs::path out = dir_ / "evil.pem";
  ASSERT_TRUE(SignRequest(dir_ / "ca", csr, out, {.clients = {"site-a"}}).ok());
  const auto text = RunProgram({"openssl", "x509", "-in", out.string(), "-noout", "-subject",
                                "-ext", "basicConstraints,extendedKeyUsage,subjectAltName"});
  EXPECT_THAT(text.output, HasSubstr("subject=CN = site-a\n"));
  EXPECT_THAT(text.output, HasSubstr("CA:FALSE"));
  EXPECT_THAT(text.output, HasSubstr("TLS Web Client Authentication"));
  EXPECT_THAT(text.output, Not(HasSubstr("Server")));
  EXPECT_THAT(text.output, Not(HasSubstr("coordinator")));
  EXPECT_THAT(text.output, Not(HasSubstr("Evil")));
  // openssl refuses it to a TLS server.
  const auto as_ca = RunProgram({"openssl", "verify", "-CAfile", (dir_ / "ca" / "ca.pem").string(),
                                 "-purpose", "sslserver", out.string()});
  EXPECT_NE(as_ca.exit_code, 0);
}

// The coordinator's certificate is signed for the names the operator gives, and a CA directory
// is new (a trailing slash names the same one).
TEST_F(CertsTest, TheCoordinatorRequestsItsCertificateLikeASite) {
  ASSERT_TRUE(InitAuthority(dir_ / "offline/", {}).ok());
  EXPECT_TRUE(fs::exists(dir_ / "offline" / "ca.key"));
  EXPECT_FALSE(fs::exists(dir_ / "offline" / "server.key"));
  ASSERT_TRUE(RequestCertificate(dir_ / "coord", "coordinator").ok());
  ASSERT_TRUE(SignRequest(dir_ / "offline", dir_ / "coord" / "coordinator.csr",
                          dir_ / "coord" / "server.pem",
                          {.server_names = {"coordinator.example", "10.0.0.5"}})
                  .ok());
  const auto text = RunProgram({"openssl", "x509", "-in", (dir_ / "coord" / "server.pem").string(),
                                "-noout", "-ext", "subjectAltName,extendedKeyUsage"});
  EXPECT_THAT(text.output, HasSubstr("DNS:coordinator.example, IP Address:10.0.0.5"));
  EXPECT_THAT(text.output, HasSubstr("TLS Web Server Authentication"));
  EXPECT_FALSE(SignRequest(dir_ / "offline", dir_ / "coord" / "coordinator.csr",
                           dir_ / "coord" / "x.pem", {.server_names = {"bad name"}})
                   .ok());
}

TEST_F(CertsTest, ARevokedCertificateIsInTheCrlAndOnlyIt) {
  const fs::path old_cert = Enrol("site-a", "site");
  const fs::path new_cert = Enrol("site-a", "site2", /*reissue=*/true);
  const fs::path b = Enrol("site-b", "site3");
  const std::string old_serial = OpenSsl(old_cert, "-serial");
  std::string lower = "00" + old_serial;  // as a person might type it
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  auto revoked = Revoke(dir_ / "ca", "site-a", lower);
  ASSERT_TRUE(revoked.ok()) << revoked.status();
  EXPECT_EQ(*revoked, std::vector<std::string>{old_serial});
  EXPECT_TRUE(absl::IsNotFound(Revoke(dir_ / "ca", "site-a", old_serial).status()));
  const std::string crl = (dir_ / "ca" / "crl.pem").string(),
                    ca = (dir_ / "ca" / "ca.pem").string();
  // openssl agrees: the old certificate is revoked, the reissued one and site-b's are not.
  EXPECT_NE(RunProgram({"openssl", "verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl,
                        old_cert.string()})
                .exit_code,
            0);
  for (const fs::path& good : {new_cert, b}) {
    const auto r = RunProgram(
        {"openssl", "verify", "-crl_check", "-CAfile", ca, "-CRLfile", crl, good.string()});
    EXPECT_EQ(r.exit_code, 0) << r.output;
  }
  std::vector<std::string> warnings;
  auto list = RevocationList::Load(crl, ReadText(ca), ca, &warnings);
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_TRUE(warnings.empty());
  EXPECT_EQ((*list)->size(), 1u);
  EXPECT_TRUE((*list)->Revoked(*IdentifyCertificate(ReadText(old_cert))));
  EXPECT_FALSE((*list)->Revoked(*IdentifyCertificate(ReadText(new_cert))));
  EXPECT_FALSE((*list)->Revoked(*IdentifyCertificate(ReadText(b))));
  // Revoking by name takes every certificate of it that stands.
  ASSERT_TRUE(Revoke(dir_ / "ca", "site-a", "").ok());
  list = RevocationList::Load(crl, ReadText(ca), ca, &warnings);
  ASSERT_TRUE(list.ok());
  EXPECT_EQ((*list)->size(), 2u);
}

TEST_F(CertsTest, ACrlOfAnotherCaOrNoCrlAtAllIsRefused) {
  ASSERT_TRUE(InitAuthority(dir_ / "other", {"localhost"}).ok());
  ASSERT_TRUE(RequestCertificate(dir_ / "s", "site-a").ok());
  ASSERT_TRUE(SignRequest(dir_ / "other", dir_ / "s" / "site-a.csr", dir_ / "s" / "a.pem",
                          {.clients = {"site-a"}})
                  .ok());
  ASSERT_TRUE(Revoke(dir_ / "other", "site-a", "").ok());
  std::vector<std::string> warnings;
  const std::string ca = (dir_ / "ca" / "ca.pem").string();
  auto list =
      RevocationList::Load((dir_ / "other" / "crl.pem").string(), ReadText(ca), ca, &warnings);
  EXPECT_TRUE(absl::IsInvalidArgument(list.status()));
  EXPECT_THAT(list.status().message(), HasSubstr("is not signed by a CA certificate"));
  list = RevocationList::Load(ca, ReadText(ca), ca, &warnings);
  EXPECT_THAT(list.status().message(), HasSubstr("holds no PEM CRL"));
  // A damaged second CRL refuses the file: it must not end the list quietly.
  ASSERT_TRUE(RequestCertificate(dir_ / "t", "site-b").ok());
  ASSERT_TRUE(SignRequest(dir_ / "ca", dir_ / "t" / "site-b.csr", dir_ / "t" / "b.pem",
                          {.clients = {"site-b"}})
                  .ok());
  ASSERT_TRUE(Revoke(dir_ / "ca", "site-b", "").ok());
  const std::string good = ReadText(dir_ / "ca" / "crl.pem");
  std::string damaged = good;
  damaged[damaged.size() / 2] = '!';
  std::ofstream(dir_ / "two.pem") << good << damaged;
  list = RevocationList::Load((dir_ / "two.pem").string(), ReadText(ca), ca, &warnings);
  EXPECT_TRUE(absl::IsInvalidArgument(list.status())) << list.status();
  EXPECT_THAT(list.status().message(), HasSubstr("CRL 2 of"));
  // So does a damaged certificate in the client CA bundle.
  std::string bundle = ReadText(ca) + ReadText(ca);
  bundle[bundle.size() * 3 / 4] = '!';
  list = RevocationList::Load((dir_ / "ca" / "crl.pem").string(), bundle, ca, &warnings);
  EXPECT_THAT(list.status().message(), HasSubstr("certificate 2 of"));
}

}  // namespace
}  // namespace fedlora::common
