#include "server/accumulate/accumulator.h"

namespace fedlora::server {

std::vector<std::string> ClientsOf(const std::vector<AcceptedUpdate>& updates) {
  std::vector<std::string> clients;
  for (const AcceptedUpdate& u : updates) clients.push_back(u.client);
  return clients;
}

}  // namespace fedlora::server
