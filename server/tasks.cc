#include "server/tasks.h"

#include <algorithm>

#include "common/net/wire.h"

namespace fedlora::server {

v1::BlobRef ToProto(const BlobRef& b) {
  v1::BlobRef ref;
  ref.set_sha256(b.sha256);
  ref.set_size(b.size);
  ref.set_kind(common::ToWire(b.kind));
  ref.set_version(b.version);
  return ref;
}

std::vector<v1::BlobRef> DownloadsFor(const Ledger& ledger, int64_t have, int64_t target) {
  std::vector<v1::BlobRef> out;
  auto add = [&](const BlobRef& b) { out.push_back(ToProto(b)); };
  if (have >= target) return out;
  switch (ledger.method) {
    case common::Method::kFedIt:
    case common::Method::kLoraFair:
      for (const BlobRef& b : ledger.at(target).blobs) add(b);  // the latest adapter is the state
      break;
    case common::Method::kFlora:
      for (int64_t v = std::max<int64_t>(have, 0) + 1; v <= target; ++v) {
        for (const BlobRef& b : ledger.at(v).blobs) add(b);
      }
      break;
    case common::Method::kFedSb:
      if (have < 0) add(ledger.at(0).blobs.at(0));
      if (target > 0) add(ledger.at(target).blobs.at(0));
      break;
  }
  return out;
}

void LongPolls::Add(std::string client, int64_t have_version,
                    std::chrono::steady_clock::time_point deadline, TaskCallback done) {
  next_deadline_ = std::min(next_deadline_, deadline);
  waiters_.push_back({std::move(client), have_version, deadline, std::move(done)});
}

void LongPolls::Collect(const std::function<v1::Task(const std::string&, int64_t)>& task_for,
                        std::chrono::steady_clock::time_point now, Scope scope, Ready* ready) {
  // The engine calls this after every upload and every tick: with thousands waiting, looking at
  // each of them every time made a round quadratic in the cohort.
  if (scope == Scope::kExpired && now < next_deadline_) return;
  next_deadline_ = std::chrono::steady_clock::time_point::max();
  std::vector<Waiter> still;
  for (Waiter& w : waiters_) {
    const bool expired = now >= w.deadline;
    if (scope == Scope::kExpired && !expired) {
      next_deadline_ = std::min(next_deadline_, w.deadline);
      still.push_back(std::move(w));
      continue;
    }
    v1::Task task = task_for(w.client, w.have_version);
    if (scope == Scope::kAll || expired || task.kind() != v1::Task::WAIT) {
      ready->emplace_back(std::move(w.done), std::move(task));
    } else {
      next_deadline_ = std::min(next_deadline_, w.deadline);
      still.push_back(std::move(w));
    }
  }
  waiters_ = std::move(still);
}

void LongPolls::Deliver(Ready& ready) {
  for (auto& [done, task] : ready) done(std::move(task));
  ready.clear();
}

}  // namespace fedlora::server
