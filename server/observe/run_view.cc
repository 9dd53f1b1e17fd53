#include "server/observe/run_view.h"

#include <google/protobuf/util/json_util.h>

#include <cmath>

#include "common/base/proc_stats.h"
#include "common/base/strings.h"

namespace fedlora::server {
namespace {

using common::StrCat;

// A sample's value: integers as such, others with every digit a double has, infinity as +Inf.
std::string Number(double v) {
  if (std::isinf(v)) return v > 0 ? "+Inf" : "-Inf";
  if (std::isnan(v)) return "NaN";
  return fmt::format("{}", v);
}

// A label value, escaped as the exposition format wants (backslash, double quote, newline).
std::string Label(std::string_view v) {
  std::string out;
  for (const char c : v) {
    if (c == '\\' || c == '"') out += '\\';
    out += c == '\n' ? std::string("\\n") : std::string(1, c);
  }
  return out;
}

class Exposition {
 public:
  // A metric's HELP and TYPE lines; its samples follow.
  Exposition& Family(std::string_view name, std::string_view type, std::string_view help) {
    text_ += StrCat("# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
    return *this;
  }
  Exposition& Sample(std::string_view name, double value, std::string_view labels = "") {
    text_ += StrCat(name, labels.empty() ? "" : StrCat("{", labels, "}"), " ", Number(value), "\n");
    return *this;
  }
  std::string text() && { return std::move(text_); }

 private:
  std::string text_;
};

nlohmann::json Summary(const common::MetricsLine& line) {
  const common::RoundRecord& r = line.record;
  int64_t rejected = 0;
  for (const auto& [id, n] : r.who.rejected) rejected += n;
  nlohmann::json j = {{"round", r.round},
                      {"attempt", r.who.attempt},
                      {"cohort", r.who.cohort.size()},
                      {"arrived", r.who.arrived.size()},
                      {"rejected", rejected},
                      {"rejected_clients", r.who.rejected.size()},
                      {"declined", r.who.declined.size()},
                      {"dropped", r.dropped.size()},
                      {"late", r.late.size()},
                      {"removed", r.who.removed.size()},
                      {"elapsed_seconds", r.who.elapsed_seconds},
                      {"aggregation_seconds", r.aggregation_seconds},
                      {"mean_train_loss", r.mean_train_loss}};
  if (line.eval_loss) j["eval_loss"] = *line.eval_loss;
  if (line.eval_accuracy) j["eval_accuracy"] = *line.eval_accuracy;
  if (r.client_dp && r.client_dp->epsilon) j["dp_epsilon"] = *r.client_dp->epsilon;
  return j;
}

}  // namespace

RunView::RunView(nlohmann::json settings, double client_timeout_s)
    : settings_(std::move(settings)), client_timeout_s_(client_timeout_s) {
  state_.status = std::make_shared<const v1::StatusResponse>();
}

void RunView::Publish(v1::StatusResponse status, int64_t now_unix_ms) {
  auto shared = std::make_shared<const v1::StatusResponse>(std::move(status));
  absl::MutexLock lock(&mu_);
  state_.status = std::move(shared);
  state_.status_unix_ms = now_unix_ms;
}

void RunView::CountAccepted(int64_t n) {
  absl::MutexLock lock(&mu_);
  state_.accepted += n;
}

void RunView::CountRejected(std::string_view kind) {
  absl::MutexLock lock(&mu_);
  auto it = state_.rejected.find(kind);
  if (it == state_.rejected.end()) it = state_.rejected.emplace(std::string(kind), 0).first;
  ++it->second;
}

void RunView::ObserveRound(double seconds) {
  absl::MutexLock lock(&mu_);
  for (size_t i = 0; i < kRoundBuckets.size(); ++i)
    if (seconds <= kRoundBuckets[i]) ++state_.round_buckets[i];
  ++state_.rounds_observed;
  state_.round_seconds += seconds;
}

void RunView::AddLine(const common::MetricsLine& line) {
  nlohmann::json summary = Summary(line);
  auto shared = std::make_shared<const common::MetricsLine>(line);
  absl::MutexLock lock(&mu_);
  state_.rounds.push_back(std::move(summary));
  state_.last = std::move(shared);
}

RunView::Snapshot RunView::Take() const {
  absl::MutexLock lock(&mu_);
  return state_;
}

std::string RunView::StateOf(const v1::ClientStatus& c, int64_t now_unix_ms) const {
  if (!c.removed().empty()) return "removed";
  if (!c.left().empty()) return "left";
  return static_cast<double>(now_unix_ms - c.last_seen_unix_ms()) >= 1000 * client_timeout_s_
             ? "silent"
             : "live";
}

std::string RunView::Prometheus() const {
  const double rss = common::StatusBytes("VmRSS:"), cpu = common::CpuSeconds();
  const Snapshot s = Take();
  std::map<std::string, int64_t> states = {
      {"joined", 0}, {"live", 0}, {"silent", 0}, {"left", 0}, {"removed", 0}};
  int64_t up = 0, down = 0;
  for (const v1::ClientStatus& c : s.status->clients()) {
    ++states[StateOf(c, s.status_unix_ms)];
    if (c.num_examples() > 0) ++states["joined"];  // joined in this process
    up += c.bytes_up();
    down += c.bytes_down();
  }
  int64_t rejected = 0;
  for (const auto& [kind, n] : s.rejected) rejected += n;
  Exposition e;
  e.Family("fedlora_round", "gauge", "The round in progress (the last one once the run is done).")
      .Sample("fedlora_round", static_cast<double>(s.status->round()));
  e.Family("fedlora_rounds", "gauge", "Rounds the run is configured for.")
      .Sample("fedlora_rounds", static_cast<double>(s.status->rounds()));
  e.Family("fedlora_rounds_committed_total", "counter", "Rounds of the run committed so far.")
      .Sample("fedlora_rounds_committed_total",
              static_cast<double>(std::max<int64_t>(0, s.status->state_version())));
  e.Family("fedlora_updates_total", "counter",
           "Updates since the coordinator started: accepted (aggregated into a committed round), "
           "rejected (each refused upload, and each update left out as a norm outlier).")
      .Sample("fedlora_updates_total", static_cast<double>(s.accepted), "result=\"accepted\"")
      .Sample("fedlora_updates_total", static_cast<double>(rejected), "result=\"rejected\"");
  e.Family("fedlora_rejections_total", "counter",
           "Updates refused since the coordinator started, by reason.");
  for (const auto& [kind, n] : s.rejected) {
    e.Sample("fedlora_rejections_total", static_cast<double>(n),
             StrCat("reason=\"", Label(kind), "\""));
  }
  e.Family("fedlora_clients", "gauge",
           "Clients by state: live, silent (taking part; heard from within the client timeout or "
           "not), left, removed; and joined: every client that joined since the coordinator "
           "started, whatever its state.");
  for (const auto& [state, n] : states)
    e.Sample("fedlora_clients", static_cast<double>(n), StrCat("state=\"", state, "\""));
  e.Family("fedlora_round_duration_seconds", "histogram",
           "From a round's first attempt opening to its commit, since the coordinator started.");
  for (size_t i = 0; i < kRoundBuckets.size(); ++i) {
    e.Sample("fedlora_round_duration_seconds_bucket", static_cast<double>(s.round_buckets[i]),
             StrCat("le=\"", Number(kRoundBuckets[i]), "\""));
  }
  e.Sample("fedlora_round_duration_seconds_bucket", static_cast<double>(s.rounds_observed),
           "le=\"+Inf\"")
      .Sample("fedlora_round_duration_seconds_sum", s.round_seconds)
      .Sample("fedlora_round_duration_seconds_count", static_cast<double>(s.rounds_observed));
  e.Family("fedlora_bytes_total", "counter",
           "Update and download bytes moved since the coordinator started.")
      .Sample("fedlora_bytes_total", static_cast<double>(up), "direction=\"up\"")
      .Sample("fedlora_bytes_total", static_cast<double>(down), "direction=\"down\"");
  if (s.last && s.last->eval_loss) {
    e.Family("fedlora_eval_loss", "gauge", "Held-out loss of the latest evaluated global model.")
        .Sample("fedlora_eval_loss", *s.last->eval_loss);
  }
  if (s.last && s.last->eval_accuracy) {
    e.Family("fedlora_eval_accuracy", "gauge",
             "Held-out accuracy of the latest evaluated global model.")
        .Sample("fedlora_eval_accuracy", *s.last->eval_accuracy);
  }
  if (s.last && s.last->record.client_dp) {
    e.Family("fedlora_dp_epsilon", "gauge",
             "Client-level DP: epsilon spent by the run so far, at its delta (+Inf without noise).")
        .Sample("fedlora_dp_epsilon", s.last->record.client_dp->epsilon.value_or(INFINITY));
  }
  e.Family("fedlora_tls_handshake_failures_total", "counter",
           "TLS handshakes with the coordinator's gRPC port that failed, since it started.")
      .Sample("fedlora_tls_handshake_failures_total",
              static_cast<double>(handshake_failures_.load(std::memory_order_relaxed)));
  e.Family("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.")
      .Sample("process_resident_memory_bytes", rss);
  e.Family("process_cpu_seconds_total", "counter", "Total user and system CPU time in seconds.")
      .Sample("process_cpu_seconds_total", cpu);
  return std::move(e).text();
}

nlohmann::json RunView::Page() const {
  Snapshot s = Take();
  std::string status_json;
  google::protobuf::util::JsonPrintOptions options;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(*s.status, &status_json, options);
  nlohmann::json status = nlohmann::json::parse(status_json, nullptr, false);
  status.erase("clients");
  nlohmann::json clients = nlohmann::json::array();
  for (const v1::ClientStatus& c : s.status->clients()) {
    nlohmann::json row = {{"id", c.id()},
                          {"state", StateOf(c, s.status_unix_ms)},
                          {"examples", c.num_examples()},
                          {"last_seen_s", (s.status_unix_ms - c.last_seen_unix_ms()) / 1000.0},
                          {"rounds_contributed", c.rounds_contributed()},
                          {"rejected_updates", c.rejected_updates()},
                          {"bytes_up", c.bytes_up()},
                          {"bytes_down", c.bytes_down()},
                          {"removed", c.removed()}};
    if (c.num_examples() == 0) row.erase("last_seen_s");  // removed in an earlier process
    if (s.last) {
      const auto& share = s.last->record.weight_share;
      if (auto it = share.find(c.id()); it != share.end()) row["weight_share"] = it->second;
    }
    clients.push_back(std::move(row));
  }
  return {{"settings", settings_},
          {"status", std::move(status)},
          {"rounds", std::move(s.rounds)},
          {"clients", std::move(clients)},
          {"now_unix_ms", s.status_unix_ms}};
}

}  // namespace fedlora::server
