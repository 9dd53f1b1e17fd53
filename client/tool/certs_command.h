// fedlora certs — certificates for a federation where no key leaves its machine
// (common/net/certs.h):
// clang-format off
//   fedlora certs init --dir CA [--server-name coordinator.example.org ...]   (the operator's CA)
//   fedlora certs request --cn site-a --out DIR        (at the site: DIR/site-a.key stays, DIR/site-a.csr goes)
//   fedlora certs sign --ca CA --csr site-a.csr --out site-a.pem --config server.toml [--operator] [--reissue]
//   fedlora certs sign --ca CA --csr coordinator.csr --out server.pem --server-name coordinator.example.org
//   fedlora certs revoke --ca CA --cn site-a [--serial HEX]   (writes CA/crl.pem for --crl)
// clang-format on
#ifndef FEDLORA_CLIENT_TOOL_CERTS_COMMAND_H_
#define FEDLORA_CLIENT_TOOL_CERTS_COMMAND_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace fedlora::tool {

struct CertsCommandOptions {
  std::string action;  // init, request, sign, revoke
  std::string dir;     // init: the CA's directory; request: where the key and request go
  std::vector<std::string> server_names;  // init, sign: the coordinator's names
  std::string cn;                         // request, revoke
  std::string ca;                         // sign, revoke: the CA's directory
  std::string csr, out;                   // sign
  // sign: the names that may be issued, from the coordinator's TOML config (its allowed-clients
  // and operators, as arrays) and/or listed here (clients).
  std::string config;
  std::vector<std::string> allowed;
  bool as_operator = false;  // sign an operator's name
  bool reissue = false;      // sign
  std::string serial;        // revoke: only this certificate
  int days = 825;            // init (the server's certificate), sign
};

absl::Status Run(const CertsCommandOptions& options);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_CERTS_COMMAND_H_
