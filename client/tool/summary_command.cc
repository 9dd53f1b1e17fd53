// fedlora summary STATE_DIR... — one line per coordinator run, from its metrics.jsonl: the global
// model's loss (held-out, when the coordinator evaluated one; else on the clients' data) at the
// first and last round, the last mean training loss, bytes per client per round and wall time;
// then, for runs with held-out loss, that loss round by round, and for private runs the ε spent.
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "client/tool/commands.h"
#include "common/base/file_util.h"
#include "common/base/strings.h"

namespace fedlora::tool {
namespace {

void Run(const std::vector<std::string>& dirs, const std::string& out) {
  std::string by_round, accuracy, privacy;
  std::string table =
      common::StrCat(fmt::format("{:<10} {:>6} {:>22} {:>16} {:>18} {:>20} {:>9}\n", "method",
                                 "rounds", "global loss (first->last)", "last train loss",
                                 "bytes up/client/rd", "bytes down/client/rd", "wall s"));
  for (const std::string& dir : dirs) {
    std::ifstream in(dir + "/metrics.jsonl");
    if (!in) ExitIfError(absl::NotFoundError(common::StrCat("no metrics.jsonl in ", dir)));
    std::vector<nlohmann::json> rounds;
    for (std::string line; std::getline(in, line);) {
      auto j = nlohmann::json::parse(line, nullptr, false);
      if (j.is_discarded())
        ExitIfError(absl::DataLossError(common::StrCat(dir, "/metrics.jsonl has a bad line")));
      rounds.push_back(std::move(j));
    }
    if (rounds.empty())
      ExitIfError(absl::NotFoundError(common::StrCat(dir, " has no closed round")));
    double up = 0, down = 0, n = 0;
    for (const auto& r : rounds) {
      for (const auto& [id, b] : r["bytes_up"].items()) up += b.get<double>(), n += 1;
      for (const auto& [id, b] : r["bytes_down"].items()) down += b.get<double>();
    }
    const auto& first = rounds.front();
    const auto& last = rounds.back();
    // Held-out loss after the first and last round, or the global model's loss on the clients'
    // data at the start of the first and last round.
    const bool held_out = last.contains("eval_loss");
    const char* key = held_out ? "eval_loss" : "mean_loss_before";
    table += fmt::format("{:<10} {:>6} {:>22} {:>16.6f} {:>18.0f} {:>20.0f} {:>9.2f}\n",
                         last["method"].get<std::string>(), rounds.size(),
                         fmt::format("{:.4f} -> {:.4f}{}", first[key].get<double>(),
                                     last[key].get<double>(), held_out ? " *" : ""),
                         last["mean_train_loss"].get<double>(), up / n, down / n,
                         last.value("elapsed_seconds", 0.0));
    // Privacy spent by the end: the coordinator's client-level ε, the most a DP-SGD client spent.
    std::string spent;
    if (last.contains("client_dp")) {
      const auto& dp = last["client_dp"];
      spent += dp["epsilon"].is_null()
                   ? std::string(" client-level: no noise (epsilon infinite)")
                   : fmt::format(" client-level epsilon {:.4f} at delta {}",
                                 dp["epsilon"].get<double>(), dp["delta"].get<double>());
    }
    double dp_sgd = 0;
    for (const auto& r : rounds) {
      if (!r.contains("dp_epsilon")) continue;
      for (const auto& [id, e] : r["dp_epsilon"].items())
        dp_sgd = std::max(dp_sgd, e.get<double>());
    }
    if (dp_sgd > 0) spent += fmt::format(" DP-SGD: most spent by a client epsilon {:.4f}", dp_sgd);
    if (!spent.empty())
      privacy += fmt::format("{:<10}{}\n", last["method"].get<std::string>(), spent);
    if (held_out) {
      by_round += fmt::format("{:<10}", last["method"].get<std::string>());
      for (const auto& r : rounds) by_round += fmt::format(" {:.4f}", r.value("eval_loss", 0.0));
      by_round += "\n";
    }
    if (last.contains("eval_accuracy")) {
      accuracy += fmt::format("{:<10}", last["method"].get<std::string>());
      for (const auto& r : rounds)
        accuracy += fmt::format(" {:.4f}", r.value("eval_accuracy", 0.0));
      accuracy += "\n";
    }
  }
  if (!by_round.empty())
    table += "\n* held-out loss of the global model after the round; by round:\n" + by_round;
  if (!accuracy.empty())
    table += "\nheld-out accuracy of the global model's answers after the round (exact match):\n" +
             accuracy;
  if (!privacy.empty()) table += "\nprivacy spent by the last round:\n" + privacy;
  std::fputs(table.c_str(), stdout);
  if (!out.empty()) ExitIfError(common::WriteFileAtomically(out, table));
}

}  // namespace

void AddSummaryCommand(CLI::App& app) {
  auto dirs = std::make_shared<std::vector<std::string>>();
  auto out = std::make_shared<std::string>();
  CLI::App* cmd =
      app.add_subcommand("summary", "Summarise coordinator runs from their state directories");
  cmd->add_option("dirs", *dirs, "fedlora-server --state-dir directories")->required();
  cmd->add_option("--out", *out, "also write the table to this file");
  cmd->callback([dirs, out] { Run(*dirs, *out); });
}

}  // namespace fedlora::tool
