// The clients of a run: who has joined (admission checks their request against the run), what
// each reported, when each was last heard from, and who has left.
#ifndef FEDLORA_SERVER_CLIENT_REGISTRY_H_
#define FEDLORA_SERVER_CLIENT_REGISTRY_H_

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/state_store.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

// OK when `request` may join a run on base model `expected_sha256` (empty: not pinned yet) that
// trains rank `rank` on `modules` (empty: the run does not exist yet). Otherwise the status says
// what was expected and what came: INVALID_ARGUMENT for a malformed request, FAILED_PRECONDITION
// for a client that cannot take part (other weights, a lower max_rank, a missing module). A
// num_examples above `max_examples` is INVALID_ARGUMENT.
absl::Status CheckAdmission(const v1::JoinRequest& request, const std::string& expected_sha256,
                            int rank, const std::vector<ModuleSpec>& modules, int64_t max_examples);

struct ClientInfo {
  int64_t num_examples = 0;
  std::chrono::steady_clock::time_point last_seen;
  int64_t rounds_contributed = 0;
  int64_t bytes_down_this_round = 0;
  int64_t bytes_up = 0, bytes_down = 0;  // since the coordinator started
  std::string left;                      // why the client left the run; empty while it takes part
  int64_t rejected_updates = 0;          // in this run, since the coordinator started
  std::string session;                   // of its latest join (JoinResponse.session)
  std::string peer;                      // the address that join came from
};

class ClientRegistry {
 public:
  // Records a join (or a re-join: the client takes part again); returns true for a new client.
  bool Join(const std::string& id, int64_t num_examples, std::chrono::steady_clock::time_point now);
  // A round starts: every client's bytes downloaded this round start from 0.
  void NewRound();
  // Notes that `id` was heard from (any call); unknown ids are ignored.
  void Touch(const std::string& id, std::chrono::steady_clock::time_point now);
  // Removes `id` from the run for `reason`: it is no longer drawn, and may not join again. `id`
  // need not have joined (a removal read back from the ledger).
  void Remove(const std::string& id, const std::string& reason);
  // Why `id` was removed from the run; nullptr while it may take part.
  const std::string* RemovedWhy(const std::string& id) const;
  const std::map<std::string, std::string>& removed() const { return removed_; }
  ClientInfo* Find(const std::string& id);
  // The clients taking part (joined and not left), sorted by id.
  std::vector<std::string> TakingPart() const;
  // Whether `id` has been silent for at least `timeout`.
  bool Silent(const std::string& id, std::chrono::steady_clock::time_point now,
              std::chrono::duration<double> timeout) const;
  size_t size() const { return clients_.size(); }
  const std::map<std::string, ClientInfo>& all() const { return clients_; }

 private:
  std::map<std::string, ClientInfo> clients_;   // joined
  std::map<std::string, std::string> removed_;  // client → why
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_CLIENT_REGISTRY_H_
