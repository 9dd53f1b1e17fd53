#include "client/tool/experiment_harvest.h"

#include <algorithm>
#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/run/ledger.h"
#include "common/run/records.h"

namespace fedlora::tool {

using common::StrCat;

namespace {

template <typename Value>
double MeanPerClient(const std::map<std::string, Value>& per_client) {
  double sum = 0;
  for (const auto& [id, b] : per_client) sum += static_cast<double>(b);
  return per_client.empty() ? 0.0 : sum / static_cast<double>(per_client.size());
}

}  // namespace

absl::StatusOr<std::vector<ResultRow>> HarvestCell(const Cell& cell,
                                                   const std::filesystem::path& dir, int rounds) {
  ASSIGN_OR_RETURN(const common::Ledger ledger, common::ReadLedger(dir / "state" / "ledger.json"));
  ASSIGN_OR_RETURN(const std::vector<common::MetricsLine> lines,
                   common::ReadMetrics(dir / "state" / "metrics.jsonl"));
  std::map<std::string, double> cumulative;  // per client
  auto add = [&](const common::PerClient& bytes) {
    for (const auto& [id, b] : bytes) cumulative[id] += static_cast<double>(b);
  };
  if (!ledger.versions.empty() && ledger.versions[0].init_record) {
    add(ledger.versions[0].init_record->init_bytes_up);
    add(ledger.versions[0].init_record->init_bytes_down);
  }
  std::vector<ResultRow> rows;
  double previous = 0;
  for (const common::MetricsLine& m : lines) {
    if (!m.eval_loss)
      return absl::InternalError(
          StrCat(dir.string(), ": round ", m.record.round, "'s metrics line has no eval_loss"));
    ResultRow r{cell, static_cast<int>(m.record.round), *m.eval_loss};
    r.eval_accuracy = m.eval_accuracy;
    r.accuracy_by_task = m.eval_accuracy_by_task;
    r.bytes_up = MeanPerClient(m.record.who.bytes_up);
    r.bytes_down = MeanPerClient(m.record.who.bytes_down);
    add(m.record.who.bytes_up);
    add(m.record.who.bytes_down);
    r.cumulative_bytes = MeanPerClient(cumulative);
    if (m.record.client_dp) {
      r.epsilon = m.record.client_dp->epsilon.value_or(INFINITY);
    } else {
      for (const auto& [id, e] : m.record.dp_epsilon)
        r.epsilon = std::max(r.epsilon.value_or(0.0), e);
    }
    r.wall_seconds = m.record.who.elapsed_seconds;
    r.round_seconds = r.wall_seconds - previous;
    previous = r.wall_seconds;
    rows.push_back(std::move(r));
  }
  if (static_cast<int>(rows.size()) != rounds)
    return absl::InternalError(
        StrCat(dir.string(), ": ", rows.size(), " rounds in the metrics, ", rounds, " expected"));
  return rows;
}

}  // namespace fedlora::tool
