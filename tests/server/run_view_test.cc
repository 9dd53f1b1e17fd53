// The operators' view of a run: the Prometheus exposition and the live page's data, against
// hand-counted cases.
#include "server/observe/run_view.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <regex>
#include <sstream>

namespace fedlora::server {
namespace {

using ::testing::HasSubstr;

v1::ClientStatus Client(const std::string& id, int64_t examples, int64_t seen_ms_ago,
                        int64_t bytes_up, const std::string& removed = "",
                        const std::string& left = "") {
  v1::ClientStatus c;
  c.set_id(id);
  c.set_num_examples(examples);
  c.set_last_seen_unix_ms(1'000'000 - seen_ms_ago);
  c.set_bytes_up(bytes_up);
  c.set_bytes_down(2 * bytes_up);
  c.set_removed(removed);
  c.set_left(removed.empty() ? left : removed);
  return c;
}

// The sample lines of `text` (name{labels} → value), each checked against the exposition format.
std::map<std::string, std::string> Samples(const std::string& text) {
  static const std::regex kSample(R"(^([a-z_]+(\{[a-z_]+="(\\.|[^"\\])*"\})?) (\S+)$)");
  static const std::regex kComment(R"(^# (HELP|TYPE) [a-z_]+ .+$)");
  std::map<std::string, std::string> samples;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    std::smatch m;
    if (std::regex_match(line, m, kSample)) {
      samples[m[1]] = m[4];
    } else {
      EXPECT_TRUE(std::regex_match(line, kComment)) << "not in the exposition format: " << line;
    }
  }
  return samples;
}

TEST(RunViewTest, ExposesTheRunAsPrometheusTextWithHandCountedValues) {
  RunView view({{"method", "fedit"}}, /*client_timeout_s=*/60);
  v1::StatusResponse s;
  s.set_round(4);
  s.set_rounds(5);
  s.set_state_version(3);
  *s.add_clients() = Client("a", 10, 1'000, 100);
  *s.add_clients() = Client("b", 20, 59'000, 200);
  *s.add_clients() = Client("c", 30, 61'000, 300);                 // silent
  *s.add_clients() = Client("d", 40, 1'000, 400, "", "declined");  // left
  *s.add_clients() = Client("e", 50, 1'000, 500, "removed after 3 rounds");
  *s.add_clients() = Client("f", 0, 1'000'000, 0, "removed before a restart");
  view.Publish(s, 1'000'000);
  view.CountAccepted(3);
  view.CountAccepted(4);
  view.CountRejected("too_large");
  view.CountRejected("too_large");
  view.CountRejected("norm_outlier");
  view.CountRejected("odd \"kind\"\\");
  for (const double seconds : {0.5, 7.0, 4000.0}) view.ObserveRound(seconds);
  common::MetricsLine line;
  line.record.round = 3;
  line.eval_loss = 1.2345678901234567;
  line.eval_accuracy = 0.375;
  line.record.client_dp = common::ClientDpSpend{};
  line.record.client_dp->epsilon = 2.5;
  view.AddLine(line);

  const auto samples = Samples(view.Prometheus());
  EXPECT_EQ(samples.at("fedlora_round"), "4");
  EXPECT_EQ(samples.at("fedlora_rounds_committed_total"), "3");
  EXPECT_EQ(samples.at("fedlora_updates_total{result=\"accepted\"}"), "7");
  EXPECT_EQ(samples.at("fedlora_updates_total{result=\"rejected\"}"), "4");
  EXPECT_EQ(samples.at("fedlora_rejections_total{reason=\"too_large\"}"), "2");
  EXPECT_EQ(samples.at("fedlora_rejections_total{reason=\"norm_outlier\"}"), "1");
  EXPECT_EQ(samples.at(R"(fedlora_rejections_total{reason="odd \"kind\"\\"})"), "1");
  EXPECT_EQ(samples.at("fedlora_clients{state=\"joined\"}"), "5");  // f joined in another process
  EXPECT_EQ(samples.at("fedlora_clients{state=\"live\"}"), "2");
  EXPECT_EQ(samples.at("fedlora_clients{state=\"silent\"}"), "1");
  EXPECT_EQ(samples.at("fedlora_clients{state=\"left\"}"), "1");
  EXPECT_EQ(samples.at("fedlora_clients{state=\"removed\"}"), "2");
  EXPECT_EQ(samples.at("fedlora_bytes_total{direction=\"up\"}"), "1500");
  EXPECT_EQ(samples.at("fedlora_bytes_total{direction=\"down\"}"), "3000");
  // Cumulative buckets: 0.5 ≤ 1; 7 ≤ 15; 4000 only in +Inf.
  EXPECT_EQ(samples.at("fedlora_round_duration_seconds_bucket{le=\"1\"}"), "1");
  EXPECT_EQ(samples.at("fedlora_round_duration_seconds_bucket{le=\"5\"}"), "1");
  EXPECT_EQ(samples.at("fedlora_round_duration_seconds_bucket{le=\"15\"}"), "2");
  EXPECT_EQ(samples.at("fedlora_round_duration_seconds_bucket{le=\"3600\"}"), "2");
  EXPECT_EQ(samples.at("fedlora_round_duration_seconds_bucket{le=\"+Inf\"}"), "3");
  EXPECT_EQ(samples.at("fedlora_round_duration_seconds_sum"), "4007.5");
  EXPECT_EQ(samples.at("fedlora_round_duration_seconds_count"), "3");
  // Every digit of a double, so that a scraper reads back the value metrics.jsonl holds.
  EXPECT_EQ(std::stod(samples.at("fedlora_eval_loss")), 1.2345678901234567);
  EXPECT_EQ(samples.at("fedlora_eval_accuracy"), "0.375");
  EXPECT_EQ(samples.at("fedlora_dp_epsilon"), "2.5");
  EXPECT_GT(std::stod(samples.at("process_resident_memory_bytes")), 1e6);
  EXPECT_GT(std::stod(samples.at("process_cpu_seconds_total")), 0);

  line.record.round = 4;
  line.record.client_dp->epsilon.reset();  // no noise: infinite
  view.AddLine(line);
  EXPECT_EQ(Samples(view.Prometheus()).at("fedlora_dp_epsilon"), "+Inf");
}

TEST(RunViewTest, ThePagesDataSummarisesRoundsAndClients) {
  RunView view({{"method", "flora"}, {"rounds", 2}}, 60);
  v1::StatusResponse s;
  s.set_phase("training");
  *s.add_clients() = Client("a", 10, 1'500, 100);
  *s.add_clients() = Client("f", 0, 1'000'000, 0, "removed before a restart");
  view.Publish(s, 1'000'000);
  common::MetricsLine line;
  line.record.round = 1;
  line.record.who.attempt = 2;
  line.record.who.cohort = {"a", "b", "c"};
  line.record.who.arrived = {"a", "b"};
  line.record.who.rejected = {{"c", 3000}};
  line.record.dropped = {"c"};
  line.record.weight_share = {{"a", 0.25}, {"b", 0.75}};
  line.eval_loss = 2.5;
  view.AddLine(line);

  const nlohmann::json page = view.Page();
  EXPECT_EQ(page["settings"]["method"], "flora");
  EXPECT_EQ(page["status"]["phase"], "training");
  EXPECT_FALSE(page["status"].contains("clients"));
  ASSERT_EQ(page["rounds"].size(), 1u);
  const nlohmann::json& r = page["rounds"][0];
  EXPECT_EQ(r["round"], 1);
  EXPECT_EQ(r["attempt"], 2);
  EXPECT_EQ(r["cohort"], 3);
  EXPECT_EQ(r["arrived"], 2);
  EXPECT_EQ(r["rejected"], 3000);  // updates; from one client
  EXPECT_EQ(r["rejected_clients"], 1);
  EXPECT_EQ(r["dropped"], 1);
  EXPECT_EQ(r["eval_loss"], 2.5);
  EXPECT_FALSE(r.contains("eval_accuracy"));
  ASSERT_EQ(page["clients"].size(), 2u);
  EXPECT_EQ(page["clients"][0]["state"], "live");
  EXPECT_EQ(page["clients"][0]["last_seen_s"], 1.5);
  EXPECT_EQ(page["clients"][0]["weight_share"], 0.25);
  EXPECT_EQ(page["clients"][1]["state"], "removed");
  EXPECT_FALSE(page["clients"][1].contains("last_seen_s"));
  EXPECT_THAT(page["clients"][1]["removed"].get<std::string>(), HasSubstr("before a restart"));
}

}  // namespace
}  // namespace fedlora::server
