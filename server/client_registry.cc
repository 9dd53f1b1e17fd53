#include "server/client_registry.h"

#include <algorithm>

#include "common/base/strings.h"
#include "common/tensor/adapter.h"
#include "common/tensor/blob.h"

namespace fedlora::server {

using common::StrCat;

absl::Status CheckAdmission(const v1::JoinRequest& request, const std::string& expected_sha256,
                            int rank, const std::vector<ModuleSpec>& modules,
                            int64_t max_examples) {
  if (!common::IsSha256Hex(request.base_model_sha256())) {
    return absl::InvalidArgumentError(StrCat("base_model_sha256 '", request.base_model_sha256(),
                                             "' is not a sha256 (64 lower-case hex digits)"));
  }
  if (request.num_examples() <= 0) {
    return absl::InvalidArgumentError(
        StrCat("num_examples is ", request.num_examples(), "; it must be positive"));
  }
  if (request.num_examples() > max_examples) {
    return absl::InvalidArgumentError(StrCat("num_examples is ", request.num_examples(),
                                             "; the run admits at most ", max_examples,
                                             " per client (--max-client-examples)"));
  }
  if (!expected_sha256.empty() && request.base_model_sha256() != expected_sha256) {
    return absl::FailedPreconditionError(StrCat(
        "your base model's fingerprint ", request.base_model_sha256(), " differs from the run's ",
        expected_sha256, "; hint: wrong base model? every client must hold the same weights"));
  }
  if (request.max_rank() < rank) {
    return absl::FailedPreconditionError(
        StrCat("the run trains rank ", rank, " but your max_rank is ", request.max_rank()));
  }
  for (const v1::ModuleSpec& m : request.modules()) {
    if (absl::Status st = common::CheckModuleName(m.name()); !st.ok()) return st;
    if (!common::InFeatureRange(m.in_features()) || !common::InFeatureRange(m.out_features())) {
      return absl::InvalidArgumentError(StrCat("module ", m.name(), " is ", m.out_features(), "x",
                                               m.in_features(), "; dimensions must be in [1, ",
                                               common::kMaxFeatures, "]"));
    }
  }
  for (const ModuleSpec& m : modules) {
    const auto it = std::find_if(request.modules().begin(), request.modules().end(),
                                 [&](const v1::ModuleSpec& s) { return s.name() == m.name; });
    if (it == request.modules().end() || it->in_features() != m.in_features ||
        it->out_features() != m.out_features) {
      return absl::FailedPreconditionError(StrCat("your model lacks module ", m.name, " (",
                                                  m.out_features, "x", m.in_features,
                                                  ") of the run; hint: wrong base model?"));
    }
  }
  return absl::OkStatus();
}

bool ClientRegistry::Join(const std::string& id, int64_t num_examples,
                          std::chrono::steady_clock::time_point now) {
  const bool is_new = !clients_.contains(id);
  ClientInfo& info = clients_[id];
  info.num_examples = num_examples;
  info.last_seen = now;
  info.left.clear();
  return is_new;
}

void ClientRegistry::NewRound() {
  for (auto& [id, info] : clients_) info.bytes_down_this_round = 0;
}

void ClientRegistry::Touch(const std::string& id, std::chrono::steady_clock::time_point now) {
  if (auto it = clients_.find(id); it != clients_.end()) it->second.last_seen = now;
}

void ClientRegistry::Remove(const std::string& id, const std::string& reason) {
  removed_[id] = reason;
  if (auto it = clients_.find(id); it != clients_.end()) it->second.left = reason;
}

const std::string* ClientRegistry::RemovedWhy(const std::string& id) const {
  const auto it = removed_.find(id);
  return it == removed_.end() ? nullptr : &it->second;
}

ClientInfo* ClientRegistry::Find(const std::string& id) {
  auto it = clients_.find(id);
  return it == clients_.end() ? nullptr : &it->second;
}

std::vector<std::string> ClientRegistry::TakingPart() const {
  std::vector<std::string> ids;
  for (const auto& [id, info] : clients_) {
    if (info.left.empty()) ids.push_back(id);
  }
  return ids;
}

bool ClientRegistry::Silent(const std::string& id, std::chrono::steady_clock::time_point now,
                            std::chrono::duration<double> timeout) const {
  const auto it = clients_.find(id);
  return it == clients_.end() || now - it->second.last_seen >= timeout;
}

}  // namespace fedlora::server
