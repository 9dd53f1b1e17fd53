#include "client/tool/certs_command.h"

#include <toml++/toml.h>

#include <cstdio>
#include <set>

#include "client/tool/commands.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/net/certs.h"

namespace fedlora::tool {
namespace {

using common::StrCat;

// The names `config` (the coordinator's TOML file) admits: its allowed-clients (or
// allowed_clients) into `clients`, its operators into `operators`; each a TOML array.
absl::Status AddConfigNames(const std::string& config, common::SignOptions* sign) {
  toml::table table;
  try {
    table = toml::parse_file(config);
  } catch (const toml::parse_error& e) {
    return absl::InvalidArgumentError(StrCat(config, ":", e.source().begin.line, ":",
                                             e.source().begin.column, ": ", e.description()));
  }
  for (const char* key : {"allowed-clients", "allowed_clients", "operators"}) {
    const toml::node* node = table.get(key);
    if (node == nullptr) continue;
    const toml::array* list = node->as_array();
    if (list == nullptr)
      return absl::InvalidArgumentError(
          StrCat(config, ": ", key, " is not an array of names ([\"a\", \"b\"])"));
    for (const toml::node& item : *list) {
      const auto name = item.value<std::string>();
      if (!name)
        return absl::InvalidArgumentError(StrCat(config, ": ", key, " holds a non-string"));
      (std::string_view(key) == "operators" ? sign->operators : sign->clients).insert(*name);
    }
  }
  return absl::OkStatus();
}

absl::Status Sign(const CertsCommandOptions& o) {
  common::SignOptions sign{
      {o.allowed.begin(), o.allowed.end()}, {}, o.as_operator, o.server_names, o.reissue, o.days};
  if (!o.config.empty()) RETURN_IF_ERROR(AddConfigNames(o.config, &sign));
  if (o.config.empty() && o.allowed.empty() && o.server_names.empty()) {
    return absl::InvalidArgumentError(
        "say which names may be issued: --config (the coordinator's TOML file, its "
        "allowed-clients and operators) or --allowed NAME,...; or --server-name for the "
        "coordinator's certificate");
  }
  ASSIGN_OR_RETURN(const common::CertificateId id, common::SignRequest(o.ca, o.csr, o.out, sign));
  std::printf("signed %s for %s (%s): serial %s, sha256 %s; send it back with %s/ca.pem\n",
              o.out.c_str(), id.cn.c_str(),
              !o.server_names.empty() ? "the coordinator"
              : o.as_operator         ? "an OPERATOR"
                                      : "a client",
              id.serial.c_str(), id.sha256.c_str(), o.ca.c_str());
  return absl::OkStatus();
}

}  // namespace

absl::Status Run(const CertsCommandOptions& o) {
  if (o.action == "init") {
    if (o.dir.empty()) return absl::InvalidArgumentError("certs init needs --dir DIR");
    RETURN_IF_ERROR(common::InitAuthority(o.dir, o.server_names, o.days));
    std::printf(
        "%s: ca.pem (give it to every site and the coordinator: its --client-ca), ca.key "
        "(keep it here)%s\n",
        o.dir.c_str(),
        o.server_names.empty()
            ? "; the coordinator requests its certificate like a site (certs request), "
              "signed with certs sign --server-name"
            : ", server.pem and server.key (the coordinator's --tls-cert, --tls-key)");
    return absl::OkStatus();
  }
  if (o.action == "request") {
    if (o.cn.empty() || o.dir.empty())
      return absl::InvalidArgumentError("certs request needs --cn NAME and --out DIR");
    RETURN_IF_ERROR(common::RequestCertificate(o.dir, o.cn));
    std::printf("%s/%s.key stays here; send %s/%s.csr to the coordinator's operator\n",
                o.dir.c_str(), o.cn.c_str(), o.dir.c_str(), o.cn.c_str());
    return absl::OkStatus();
  }
  if (o.action == "sign") return Sign(o);
  if (o.action == "revoke") {
    if (o.ca.empty() || o.cn.empty())
      return absl::InvalidArgumentError("certs revoke needs --ca DIR and --cn NAME");
    ASSIGN_OR_RETURN(const std::vector<std::string> serials, common::Revoke(o.ca, o.cn, o.serial));
    std::printf(
        "revoked %s's certificate %s; %s/crl.pem lists it: the coordinator refuses it once it "
        "reads that file (--crl; kill -HUP reloads it)\n",
        o.cn.c_str(), common::StrJoin(serials, ", ").c_str(), o.ca.c_str());
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      StrCat("certs ", o.action, ": expected init, request, sign or revoke"));
}

void AddCertsCommand(CLI::App& app) {
  auto o = std::make_shared<CertsCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "certs", "Certificates for a federation: every key stays on the machine that made it");
  cmd->require_subcommand(1);
  const auto add = [&](const char* name, const char* help) {
    CLI::App* sub = cmd->add_subcommand(name, help);
    sub->callback([o, name] {
      o->action = name;
      ExitIfError(Run(*o));
    });
    return sub;
  };
  CLI::App* init = add("init", "the operator's CA and the coordinator's certificate");
  init->add_option("--dir", o->dir, "new directory of the CA")->required();
  init->add_option("--server-name", o->server_names,
                   "also the coordinator's certificate and key, for this DNS name or IP address "
                   "clients dial (repeat for more)");
  init->add_option("--days", o->days, "validity of the coordinator's certificate")
      ->capture_default_str();
  CLI::App* request = add("request", "at a site: its private key and a signing request");
  request->add_option("--cn", o->cn, "the site's identity (its allow-list name)")->required();
  request->add_option("--out", o->dir, "directory of the key and the request")->required();
  CLI::App* sign = add("sign", "the operator signs a site's request");
  sign->add_option("--ca", o->ca, "the CA's directory (certs init)")->required();
  sign->add_option("--csr", o->csr, "the site's request")->required();
  sign->add_option("--out", o->out, "the certificate to send back")->required();
  sign->add_option(
      "--config", o->config,
      "the coordinator's TOML config: its allowed-clients and operators may be issued");
  sign->add_option("--allowed", o->allowed, "names that may be issued")->delimiter(',');
  sign->add_flag("--operator", o->as_operator,
                 "the request is an operator's (a name of the config's operators)");
  sign->add_option("--server-name", o->server_names,
                   "the coordinator's certificate, for this DNS name or IP address (repeat)");
  sign->add_flag("--reissue", o->reissue,
                 "sign a name that holds a certificate already (rotation; revoke the old one)");
  sign->add_option("--days", o->days, "validity")->capture_default_str();
  CLI::App* revoke = add("revoke", "revoke a site's certificates and write the CRL");
  revoke->add_option("--ca", o->ca, "the CA's directory (certs init)")->required();
  revoke->add_option("--cn", o->cn, "whose certificates")->required();
  revoke->add_option("--serial", o->serial, "only this one (hex, as sign printed it)");
}

}  // namespace fedlora::tool
