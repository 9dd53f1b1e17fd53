#include "client/tool/summary_command.h"

#include <cstdio>
#include <filesystem>

#include "client/tool/commands.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/run/records.h"

namespace fedlora::tool {

absl::Status Run(const SummaryCommandOptions& o) {
  std::string by_round, accuracy, privacy;
  std::string table =
      common::StrCat(fmt::format("{:<10} {:>6} {:>22} {:>16} {:>18} {:>20} {:>9}\n", "method",
                                 "rounds", "global loss (first->last)", "last train loss",
                                 "bytes up/client/rd", "bytes down/client/rd", "wall s"));
  for (const std::string& dir : o.dirs) {
    const std::filesystem::path file = std::filesystem::path(dir) / "metrics.jsonl";
    if (!std::filesystem::exists(file))
      return absl::NotFoundError(common::StrCat("no metrics.jsonl in ", dir));
    ASSIGN_OR_RETURN(const std::vector<common::MetricsLine> rounds, common::ReadMetrics(file));
    if (rounds.empty()) return absl::NotFoundError(common::StrCat(dir, " has no closed round"));
    double up = 0, down = 0, n = 0;
    for (const common::MetricsLine& r : rounds) {
      for (const auto& [id, b] : r.record.who.bytes_up) up += static_cast<double>(b), n += 1;
      for (const auto& [id, b] : r.record.who.bytes_down) down += static_cast<double>(b);
    }
    const common::MetricsLine& first = rounds.front();
    const common::MetricsLine& last = rounds.back();
    const std::string method(common::MethodName(last.record.method));
    // Held-out loss after the first and last round, or the global model's loss on the clients'
    // data at the start of the first and last round.
    const bool held_out = last.eval_loss.has_value();
    auto loss = [&](const common::MetricsLine& r) {
      return held_out ? r.eval_loss.value_or(0.0) : r.record.mean_loss_before;
    };
    table += fmt::format(
        "{:<10} {:>6} {:>22} {:>16.6f} {:>18.0f} {:>20.0f} {:>9.2f}\n", method, rounds.size(),
        fmt::format("{:.4f} -> {:.4f}{}", loss(first), loss(last), held_out ? " *" : ""),
        last.record.mean_train_loss, up / n, down / n, last.record.who.elapsed_seconds);
    // Privacy spent by the end: the coordinator's client-level ε, the most a DP-SGD client spent.
    std::string spent;
    if (const auto& dp = last.record.client_dp) {
      spent += dp->epsilon ? fmt::format(" client-level epsilon {:.4f} at delta {}", *dp->epsilon,
                                         dp->delta)
                           : std::string(" client-level: no noise (epsilon infinite)");
    }
    double dp_sgd = 0;
    for (const common::MetricsLine& r : rounds)
      for (const auto& [id, e] : r.record.dp_epsilon) dp_sgd = std::max(dp_sgd, e);
    if (dp_sgd > 0) spent += fmt::format(" DP-SGD: most spent by a client epsilon {:.4f}", dp_sgd);
    if (!spent.empty()) privacy += fmt::format("{:<10}{}\n", method, spent);
    if (held_out) {
      by_round += fmt::format("{:<10}", method);
      for (const common::MetricsLine& r : rounds)
        by_round += fmt::format(" {:.4f}", r.eval_loss.value_or(0.0));
      by_round += "\n";
    }
    if (last.eval_accuracy) {
      accuracy += fmt::format("{:<10}", method);
      for (const common::MetricsLine& r : rounds)
        accuracy += fmt::format(" {:.4f}", r.eval_accuracy.value_or(0.0));
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
  if (o.out.empty()) return absl::OkStatus();
  return common::WriteFileAtomically(o.out, table);
}

void AddSummaryCommand(CLI::App& app) {
  auto o = std::make_shared<SummaryCommandOptions>();
  CLI::App* cmd =
      app.add_subcommand("summary", "Summarise coordinator runs from their state directories");
  cmd->add_option("dirs", o->dirs, "fedlora-server --state-dir directories")->required();
  cmd->add_option("--out", o->out, "also write the table to this file");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
