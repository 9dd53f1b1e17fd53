#include "client/tool/experiment_report.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "client/tool/experiment_processes.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::tool {

using common::StrCat;
namespace fs = std::filesystem;

namespace {

std::string Exact(double x) { return fmt::format("{:.17g}", x); }
std::string Exact(const std::optional<double>& x) { return x ? Exact(*x) : std::string(); }

struct MeanSd {
  double mean = 0, sd = 0;
  size_t n = 0;
};

// Mean and sample standard deviation (n − 1; 0 for one value).
MeanSd Stats(const std::vector<double>& v) {
  MeanSd s{0, 0, v.size()};
  for (double x : v) s.mean += x / static_cast<double>(v.size());
  for (double x : v) s.sd += (x - s.mean) * (x - s.mean);
  s.sd = v.size() > 1 ? std::sqrt(s.sd / static_cast<double>(v.size() - 1)) : 0.0;
  return s;
}

std::string Show(const MeanSd& s, int digits) {
  return s.n > 1 ? fmt::format("{:.{}f} ± {:.{}f}", s.mean, digits, s.sd, digits)
                 : fmt::format("{:.{}f}", s.mean, digits);
}

// A line of the report and the plots: a method (with the grid's other settings when they vary)
// or a baseline.
struct Group {
  std::string label;
  bool baseline = false;  // centralised or local-only: its sites send nothing a federation would
  // Per seed, per round: the values (a local-only seed averages its sites).
  std::map<uint64_t, std::map<int, std::vector<const ResultRow*>>> by_seed;
  // Per round, over seeds (filled once every row is in).
  std::map<int, MeanSd> loss, accuracy, mb, epsilon;
};

std::string GroupLabel(const ExperimentSpec& spec, const Cell& c) {
  std::string label = c.kind == "local" ? "local-only" : c.kind;
  if (spec.clients.size() > 1) label += StrCat(" K=", c.clients);
  if (spec.alphas.size() > 1) label += StrCat(" α=", c.alpha);
  if (spec.dp_noise.size() > 1 && c.kind != "local" && c.kind != "centralised")
    label += c.dp_noise > 0 ? StrCat(" σ=", c.dp_noise) : std::string(" no DP");
  if (!c.client_ranks.empty()) label += " ranks " + common::StrJoin(c.client_ranks, "/");
  return label;
}

// Per round, over seeds, of a per-seed value (the mean over the seed's rows: sites of local-only).
template <typename Fn>
std::map<int, MeanSd> Series(const Group& g, Fn value) {
  std::map<int, std::vector<double>> per_round;
  for (const auto& [seed, rounds] : g.by_seed)
    for (const auto& [round, rows] : rounds) {
      double sum = 0;
      for (const ResultRow* r : rows) sum += value(*r);
      per_round[round].push_back(sum / static_cast<double>(rows.size()));
    }
  std::map<int, MeanSd> out;
  for (const auto& [round, v] : per_round) out[round] = Stats(v);
  return out;
}

std::string Quote(const std::string& file) { return "'" + file + "'"; }

// The CSVs: every value as the coordinator wrote it (17 significant digits); accuracy per task
// tidy too, one row per cell × round × task (results_by_task.csv, written when there are tasks).
// Returns the tasks.
absl::StatusOr<std::set<std::string>> WriteCsvs(const std::vector<ResultRow>& rows,
                                                const fs::path& out) {
  std::string csv =
      "cell,kind,seed,clients,split,alpha,dp_noise_multiplier,client_ranks,site,round,eval_loss,"
      "eval_accuracy,"
      "bytes_up_per_client,bytes_down_per_client,cumulative_bytes_per_client,epsilon,"
      "round_seconds,wall_seconds\n";
  for (const ResultRow& r : rows) {
    const Cell& c = r.cell;
    const std::string ranks = common::StrJoin(c.client_ranks, ";");
    csv += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n", c.id(), c.kind,
                       c.seed, c.clients, c.split, c.alpha, c.dp_noise, ranks,
                       c.site > 0 ? StrCat("client-", c.site) : std::string(), r.round,
                       Exact(r.eval_loss), Exact(r.eval_accuracy), Exact(r.bytes_up),
                       Exact(r.bytes_down), Exact(r.cumulative_bytes), Exact(r.epsilon),
                       Exact(r.round_seconds), Exact(r.wall_seconds));
  }
  RETURN_IF_ERROR(common::WriteFileAtomically(out / "results.csv", csv));
  std::set<std::string> tasks;
  std::string by_task = "cell,round,task,eval_accuracy\n";
  for (const ResultRow& r : rows)
    for (const auto& [task, accuracy] : r.accuracy_by_task) {
      tasks.insert(task);
      by_task += fmt::format("{},{},{},{}\n", r.cell.id(), r.round, task, Exact(accuracy));
    }
  if (!tasks.empty())
    RETURN_IF_ERROR(common::WriteFileAtomically(out / "results_by_task.csv", by_task));
  return tasks;
}

// The rows grouped into the report's lines, in the order they first appear, with their series.
std::vector<Group> Groups(const ExperimentSpec& spec, const std::vector<ResultRow>& rows) {
  std::vector<Group> groups;
  std::map<std::string, size_t> index;
  for (const ResultRow& r : rows) {
    const std::string label = GroupLabel(spec, r.cell);
    auto [it, added] = index.emplace(label, groups.size());
    if (added)
      groups.push_back(
          {.label = label, .baseline = r.cell.kind == "centralised" || r.cell.kind == "local"});
    groups[it->second].by_seed[r.cell.seed][r.round].push_back(&r);
  }
  for (Group& g : groups) {
    g.loss = Series(g, [](const ResultRow& r) { return r.eval_loss; });
    g.accuracy = Series(g, [](const ResultRow& r) { return r.eval_accuracy.value_or(0); });
    g.mb = Series(g, [](const ResultRow& r) { return r.cumulative_bytes / (1024.0 * 1024.0); });
    g.epsilon = Series(g, [](const ResultRow& r) { return r.epsilon.value_or(0); });
  }
  return groups;
}

// The report's text before the plots: the setting, the table of the last round, and accuracy per
// task when there are tasks.
std::string ReportText(const ExperimentSpec& spec, const std::vector<Group>& groups,
                       const std::set<std::string>& tasks, bool accuracy) {
  std::string md = StrCat("# Experiment ", spec.name, "\n\n");
  md +=
      StrCat("Model: ", spec.preset.empty() ? spec.model_dir.string() : "preset " + spec.preset,
             ". Data: ",
             spec.synthetic ? std::string("synthetic (fedlora make-data)") : spec.data_dir.string(),
             ", partition ", spec.partition, ". ", spec.rounds, " rounds of ", spec.local_steps,
             " local steps (batch ", spec.batch, "); LoRA targets ");
  md += common::StrJoin(spec.targets, ",");
  md += StrCat(
      ". Centralised: one site with the pooled data and the federation's total steps; "
      "local-only: each client alone, averaged over clients (neither communicates). Values after "
      "the last round, mean ± sample standard deviation over seeds; MB per client: sent and "
      "received over the run, Fed-SB's initialisation included.\n\n");
  md += "| run | seeds | accuracy | held-out loss | MB per client | ε |\n";
  md += "|---|---|---|---|---|---|\n";
  const int last = spec.rounds;
  for (const Group& g : groups) {
    const auto &loss = g.loss, &acc = g.accuracy, &mb = g.mb, &eps = g.epsilon;
    md += fmt::format("| {} | {} | {} | {} | {} | {} |\n", g.label, g.by_seed.size(),
                      accuracy ? Show(acc.at(last), 4) : "–", Show(loss.at(last), 4),
                      g.baseline ? "–" : fmt::format("{:.3f}", mb.at(last).mean),
                      eps.at(last).mean > 0 ? Show(eps.at(last), 2) : "–");
  }
  if (tasks.empty()) return md;
  md += "\nAccuracy per task after the last round (results_by_task.csv):\n\n| run |";
  for (const std::string& t : tasks) md += " " + t + " |";
  md += "\n|---|";
  for (size_t i = 0; i < tasks.size(); ++i) md += "---|";
  md += "\n";
  for (const Group& g : groups) {
    md += "| " + g.label + " |";
    for (const std::string& t : tasks) {
      const auto acc = Series(g, [&](const ResultRow& r) {
        const auto it = r.accuracy_by_task.find(t);
        return it == r.accuracy_by_task.end() ? 0.0 : it->second;
      });
      md += " " + Show(acc.at(last), 4) + " |";
    }
    md += "\n";
  }
  return md;
}

// The gnuplot script drawing plots/<file>.tmp for each plot, whose names are added to `made`.
std::string PlotScript(const std::vector<Group>& groups, bool accuracy,
                       std::vector<std::string>& made) {
  auto curves = [&](const char* file, const char* ylabel, int mean, int sd) {
    std::string gp = StrCat("set output ", Quote(std::string(file) + ".tmp"),
                            "\nset xlabel 'round'\nset ylabel '", ylabel, "'\nplot ");
    for (size_t i = 0; i < groups.size(); ++i) {
      const std::string dat = Quote(StrCat("group-", i, ".dat"));
      gp += StrCat(i ? ", \\\n     " : "", dat, " using 1:($", mean, "-$", sd, "):($", mean, "+$",
                   sd, ") with filledcurves lc ", i + 1, " fs transparent solid 0.15 notitle, ",
                   dat, " using 1:", mean, " with linespoints lc ", i + 1, " lw 2 pt ", i + 1,
                   " title '", groups[i].label, "'");
    }
    return gp + "\n";
  };
  std::string gp =
      "set terminal svg size 900,520 dynamic enhanced font 'sans,12' background rgb 'white'\n"
      "set key outside right\nset grid\nset xtics 1\n";
  gp += curves("loss.svg", "held-out loss (mean ± sd over seeds)", 2, 3);
  made.push_back("loss.svg");
  if (!accuracy) return gp;
  gp += curves("accuracy.svg", "held-out accuracy (mean ± sd over seeds)", 4, 5);
  gp += StrCat("set output ", Quote("accuracy_vs_bytes.svg.tmp"),
               "\nset xtics auto\nset logscale x\nset xlabel 'MB per client (up + down), "
               "cumulative'\nset ylabel 'held-out accuracy'\nplot ");
  bool first = true;
  for (size_t i = 0; i < groups.size(); ++i) {
    if (groups[i].baseline) continue;
    gp += StrCat(first ? "" : ", \\\n     ", Quote(StrCat("group-", i, ".dat")),
                 " using 6:4:5 with yerrorlines lc ", i + 1, " lw 2 pt ", i + 1, " title '",
                 groups[i].label, "'");
    first = false;
  }
  gp += "\nunset logscale x\n";
  made.push_back("accuracy.svg");
  made.push_back("accuracy_vs_bytes.svg");
  return gp;
}

// The plots' data (per group, per round) and script in out/plots, and the plots when gnuplot
// draws them; returns the report's lines that show them (or say why there are none).
absl::StatusOr<std::string> WritePlots(const std::vector<Group>& groups, bool accuracy,
                                       const fs::path& out) {
  const fs::path plots = out / "plots";
  fs::create_directories(plots);
  for (size_t i = 0; i < groups.size(); ++i) {
    const auto &loss = groups[i].loss, &acc = groups[i].accuracy, &mb = groups[i].mb;
    std::string dat = "# round loss_mean loss_sd accuracy_mean accuracy_sd mb_per_client\n";
    for (const auto& [round, l] : loss)
      dat +=
          fmt::format("{} {} {} {} {} {}\n", round, Exact(l.mean), Exact(l.sd),
                      Exact(acc.at(round).mean), Exact(acc.at(round).sd), Exact(mb.at(round).mean));
    RETURN_IF_ERROR(common::WriteFileAtomically(plots / StrCat("group-", i, ".dat"), dat));
  }
  std::vector<std::string> made;
  RETURN_IF_ERROR(
      common::WriteFileAtomically(plots / "plots.gp", PlotScript(groups, accuracy, made)));
  // In plots/, which the script's file names are relative to.
  const absl::Status drawn =
      RunToEnd({"gnuplot", "plots.gp"}, fs::absolute(plots / "gnuplot.log"), plots);
  if (!drawn.ok())
    return std::string(
        "\nNo plots: gnuplot failed or is not installed (apt-get install gnuplot-nox); "
        "plots/plots.gp draws them.\n");
  std::string md = "\n";
  for (const std::string& f : made) {
    fs::rename(plots / (f + ".tmp"), plots / f);
    md += StrCat("![", f, "](plots/", f, ")\n");
  }
  return md;
}

}  // namespace

absl::Status WriteExperimentReport(const ExperimentSpec& spec, const std::vector<ResultRow>& rows,
                                   const fs::path& out) {
  ASSIGN_OR_RETURN(const std::set<std::string> tasks, WriteCsvs(rows, out));
  const std::vector<Group> groups = Groups(spec, rows);
  const bool accuracy = std::any_of(rows.begin(), rows.end(),
                                    [](const ResultRow& r) { return r.eval_accuracy.has_value(); });
  std::string md = ReportText(spec, groups, tasks, accuracy);
  ASSIGN_OR_RETURN(const std::string plots, WritePlots(groups, accuracy, out));
  return common::WriteFileAtomically(out / "report.md", md + plots);
}

}  // namespace fedlora::tool
