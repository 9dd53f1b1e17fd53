// `fedlora experiment experiments/quick.toml` end to end, as a user runs it: real coordinator and
// client processes over mutual TLS. The CSV is checked against every cell's coordinator metrics,
// the report's table is recomputed here from the CSV, and a rerun resumes instead of repeating.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "absl/strings/str_split.h"
#include "tests/process.h"
#include "tests/test_util.h"

namespace fedlora {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

using Result = testing::CommandResult;

Result Experiment(const testing::Args& args) {
  return testing::RunProgram(
      testing::Argv(std::string(FEDLORA_BIN_DIR) + "/fedlora", "experiment", args));
}

using Row = std::map<std::string, std::string>;

std::vector<Row> ReadCsv(const fs::path& path) {
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  const std::vector<std::string> header = absl::StrSplit(line, ',');
  std::vector<Row> rows;
  while (std::getline(in, line)) {
    const std::vector<std::string> fields = absl::StrSplit(line, ',');
    EXPECT_EQ(fields.size(), header.size()) << line;
    Row row;
    for (size_t i = 0; i < header.size() && i < fields.size(); ++i) row[header[i]] = fields[i];
    rows.push_back(row);
  }
  return rows;
}

// "m ± s" with 4 decimals, as the report prints mean and sample standard deviation.
std::string MeanSd(const std::vector<double>& v) {
  double mean = 0, ss = 0;
  for (double x : v) mean += x / v.size();
  for (double x : v) ss += (x - mean) * (x - mean);
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.4f ± %.4f", mean, std::sqrt(ss / (v.size() - 1)));
  return buf;
}

TEST(ExperimentTest, QuickSpecRunsEndToEndAndItsReportIsTheCsvs) {
  testing::ScratchDir scratch;
  const fs::path out = scratch.path() / "quick";
  const std::string spec = std::string(FEDLORA_SOURCE_DIR) + "/experiments/quick.toml";
  Result r = Experiment({spec, "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("[18/18]"));
  EXPECT_THAT(r.output, HasSubstr("18 of 18 cells"));

  // 4 methods + FLoRA at ranks 2/4/16 + centralised + 3 local-only sites, × 2 seeds, × 2 rounds.
  const std::vector<Row> rows = ReadCsv(out / "results.csv");
  ASSERT_EQ(rows.size(), 36u);
  // Every row is its cell's metrics line: the coordinator's values, digit for digit.
  for (const Row& row : rows) {
    const fs::path metrics = out / "cells" / row.at("cell") / "state" / "metrics.jsonl";
    std::ifstream in(metrics);
    std::string line;
    for (int round = 1; round <= std::stoi(row.at("round")); ++round) std::getline(in, line);
    const nlohmann::json m = nlohmann::json::parse(line);
    ASSERT_EQ(m["round"].get<int>(), std::stoi(row.at("round")));
    EXPECT_EQ(std::stod(row.at("eval_loss")), m["eval_loss"].get<double>()) << row.at("cell");
    EXPECT_EQ(std::stod(row.at("eval_accuracy")), m["eval_accuracy"].get<double>());
    EXPECT_EQ(std::stod(row.at("wall_seconds")), m["elapsed_seconds"].get<double>());
    double up = 0;
    for (const auto& [id, b] : m["bytes_up"].items()) up += b.get<double>();
    EXPECT_EQ(std::stod(row.at("bytes_up_per_client")), up / m["bytes_up"].size());
    EXPECT_EQ(m["method"], row.at("kind") == "centralised" || row.at("kind") == "local"
                               ? "fedit"
                               : row.at("kind"));
    EXPECT_EQ(m["cohort"].size(),
              row.at("kind") == "centralised" || row.at("kind") == "local" ? 1u : 3u);
    if (!row.at("client_ranks").empty()) {  // each client uploads its own rank's factors
      EXPECT_EQ(row.at("client_ranks"), "2;4;16");
      EXPECT_LT(m["bytes_up"]["client-1"].get<int64_t>(), m["bytes_up"]["client-2"].get<int64_t>());
      EXPECT_LT(m["bytes_up"]["client-2"].get<int64_t>(), m["bytes_up"]["client-3"].get<int64_t>());
    }
  }

  // Accuracy per task: every row its cell's metrics value; the synthetic held-out set has the same
  // number of records in each of its six categories, so their mean is the overall accuracy.
  std::map<std::pair<std::string, std::string>, std::vector<double>> per_task;  // cell, round
  for (const Row& row : ReadCsv(out / "results_by_task.csv")) {
    const fs::path metrics = out / "cells" / row.at("cell") / "state" / "metrics.jsonl";
    const std::vector<std::string> lines = absl::StrSplit(testing::ReadText(metrics), '\n');
    const nlohmann::json m = nlohmann::json::parse(lines.at(std::stoi(row.at("round")) - 1));
    EXPECT_EQ(std::stod(row.at("eval_accuracy")),
              m["eval_accuracy_by_task"][row.at("task")].get<double>());
    per_task[{row.at("cell"), row.at("round")}].push_back(std::stod(row.at("eval_accuracy")));
  }
  ASSERT_EQ(per_task.size(), rows.size());
  for (const Row& row : rows) {
    const auto& v = per_task.at({row.at("cell"), row.at("round")});
    ASSERT_EQ(v.size(), 6u);
    double mean = 0;
    for (double x : v) mean += x / 6;
    EXPECT_NEAR(mean, std::stod(row.at("eval_accuracy")), 1e-12) << row.at("cell");
  }

  // The report's table from the CSV: the last round's values per seed (local-only: the mean of
  // its sites), then mean ± sample sd over the seeds.
  std::map<std::string, std::map<std::string, std::vector<double>>> acc, loss;  // kind, seed
  for (const Row& row : rows) {
    if (row.at("round") != "2") continue;
    const std::string label = (row.at("kind") == "local" ? "local-only" : row.at("kind")) +
                              (row.at("client_ranks").empty() ? "" : " ranks 2/4/16");
    acc[label][row.at("seed")].push_back(std::stod(row.at("eval_accuracy")));
    loss[label][row.at("seed")].push_back(std::stod(row.at("eval_loss")));
  }
  const std::string report = testing::ReadText(out / "report.md");
  for (const auto& [label, per_seed] : acc) {
    auto seeds = [](const std::map<std::string, std::vector<double>>& m) {
      std::vector<double> v;
      for (const auto& [seed, values] : m) {
        double sum = 0;
        for (double x : values) sum += x;
        v.push_back(sum / values.size());
      }
      return v;
    };
    const std::string expected = "| " + label + " | 2 | " + MeanSd(seeds(per_seed)) + " | " +
                                 MeanSd(seeds(loss[label])) + " |";
    EXPECT_THAT(report, HasSubstr(expected)) << report;
  }
  EXPECT_EQ(acc.size(), 7u);
  for (const char* plot : {"loss.svg", "accuracy.svg", "accuracy_vs_bytes.svg"}) {
    EXPECT_THAT(testing::ReadText(out / "plots" / plot), HasSubstr("<svg")) << plot;
    EXPECT_THAT(report, HasSubstr(std::string("(plots/") + plot + ")"));
  }

  // A rerun runs nothing; a cell that did not finish is run again, alone.
  const std::string csv = testing::ReadText(out / "results.csv");
  r = Experiment({spec, "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("(0 run now"));
  EXPECT_EQ(testing::ReadText(out / "results.csv"), csv);
  fs::remove(out / "cells" / "local_s2_k3_dirichlet0.5_site3" / "result.json");
  r = Experiment({spec, "--out", out.string()});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("(1 run now"));

  // Nothing to report on is an error, not an empty report.
  r = Experiment({spec, "--report-only", "--out", (scratch.path() / "none").string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("has no finished cell to report on"));

  // Other settings into the same directory are refused; a bad spec says where it is wrong.
  const fs::path changed = scratch.path() / "changed.toml";
  std::string text = testing::ReadText(spec);
  text.replace(text.find("learning_rate = 0.01"), 20, "learning_rate = 0.02");
  std::ofstream(changed) << text;
  r = Experiment({changed.string(), "--out", out.string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("holds cells of other settings"));
  std::ofstream(changed) << "[grid]\nmethods = [\"fedavg\"]\n";
  r = Experiment({changed.string()});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("[model] takes preset"));
  std::ofstream(changed) << "[model]\npreset = \"tiny\"\n[data]\nsynthetic = true\n[grid]\n"
                            "methods = [\"fedavg\"]\n";
  r = Experiment({changed.string()});
  EXPECT_THAT(r.output, HasSubstr("\"fedavg\" is not fedit, flora, lora-fair or fed-sb"));
  std::ofstream(changed) << "[model]\npreset = \"tiny\"\nrank = 4\n";
  r = Experiment({changed.string()});
  EXPECT_THAT(r.output, HasSubstr("[model] has no key \"rank\""));
}

}  // namespace
}  // namespace fedlora
