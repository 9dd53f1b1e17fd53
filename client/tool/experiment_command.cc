#include "client/tool/experiment_command.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <nlohmann/json.hpp>
#include <optional>

#include "client/tool/commands.h"
#include "client/tool/experiment_harvest.h"
#include "client/tool/experiment_partition.h"
#include "client/tool/experiment_processes.h"
#include "client/tool/experiment_report.h"
#include "client/tool/experiment_spec.h"
#include "common/base/file_util.h"
#include "common/base/signals.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/net/certs.h"

namespace fedlora::tool {

using common::StrCat;
namespace fs = std::filesystem;

namespace {

std::string Clock(double seconds) {
  const int s = static_cast<int>(seconds);
  return s >= 3600 ? fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
                   : fmt::format("{}:{:02}", s / 60, s % 60);
}

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

class Runner {
 public:
  explicit Runner(ExperimentSpec spec) : s_(std::move(spec)) {
    bin_ = fs::read_symlink("/proc/self/exe").parent_path();
  }

  absl::Status Run(bool report_only);

 private:
  // The data, the model (made by `fedlora init-model` for a preset) and the certificates.
  absl::Status Prepare();
  // Runs a cell's federation, or reads its rows when it finished before.
  absl::StatusOr<std::vector<ResultRow>> RunCell(const Cell& cell, size_t index, size_t total);
  // Runs a coordinator and a client per data file in `dir` to the end of the run.
  absl::Status Federation(const Cell& cell, const std::vector<fs::path>& data,
                          const std::string& method, int local_steps, const fs::path& dir,
                          const std::string& label);
  std::vector<std::string> CoordinatorArgv(const Cell& cell, const std::string& method, int clients,
                                           int local_steps, const fs::path& dir) const;
  std::vector<std::string> ClientArgv(int k, const std::string& port, const fs::path& data) const;

  ExperimentSpec s_;
  fs::path bin_, model_;
  ExperimentData data_;
  std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  double run_seconds_ = 0;  // spent on cells run by this process
  int cells_run_ = 0;
  std::optional<common::StopOnSignals> signals_;  // while cells run
};

absl::Status Runner::Prepare() {
  ASSIGN_OR_RETURN(data_, PrepareData(s_, bin_));
  if (!s_.preset.empty()) {
    model_ = s_.out / "model";
    if (!fs::exists(model_ / "config.json")) {
      std::vector<Record> all;
      for (const auto& file : data_.train) all.insert(all.end(), file.begin(), file.end());
      const fs::path corpus = s_.out / "data" / "corpus.jsonl";
      RETURN_IF_ERROR(common::WriteFileAtomically(corpus, Lines(all)));
      RETURN_IF_ERROR(RunToEnd(
          {(bin_ / "fedlora").string(), "init-model", "--preset", s_.preset, "--seed",
           StrCat(s_.model_seed), "--init-std", StrCat(s_.init_std), "--merges", StrCat(s_.merges),
           "--tokenizer-corpus", corpus.string(), "--out", model_.string()},
          s_.out / "data" / "init-model.log"));
    }
  } else {
    model_ = fs::absolute(s_.model_dir);
  }
  return common::MakeRunCertificates(s_.out / "certs", s_.max_clients());
}

absl::StatusOr<std::vector<ResultRow>> Runner::RunCell(const Cell& cell, size_t index,
                                                       size_t total) {
  const fs::path dir = s_.out / "cells" / cell.id();
  const fs::path result = dir / "result.json";
  const std::string label = StrCat("[", index + 1, "/", total, "] ", cell.id());
  const bool finished = fs::exists(result);
  if (!finished) {
    ASSIGN_OR_RETURN(const Split split, SplitFor(s_, data_, cell.seed, cell.clients, cell.alpha));
    fs::remove_all(dir);
    fs::create_directories(dir);
    const auto t0 = std::chrono::steady_clock::now();
    if (cell.kind == "centralised")
      RETURN_IF_ERROR(
          Federation(cell, {split.pooled}, "fedit", s_.local_steps * cell.clients, dir, label));
    else if (cell.kind == "local")
      RETURN_IF_ERROR(
          Federation(cell, {split.clients[cell.site - 1]}, "fedit", s_.local_steps, dir, label));
    else
      RETURN_IF_ERROR(Federation(cell, split.clients, cell.kind, s_.local_steps, dir, label));
    run_seconds_ += SecondsSince(t0);
    ++cells_run_;
  }
  // The rows come from the coordinator's files, whether the cell ran now or before.
  ASSIGN_OR_RETURN(std::vector<ResultRow> rows, HarvestCell(cell, dir, s_.rounds));
  if (!finished)
    RETURN_IF_ERROR(common::WriteFileAtomically(
        result, nlohmann::json({{"cell", cell.id()}, {"rounds", rows.size()}}).dump() + "\n"));
  return rows;
}

std::vector<std::string> Runner::CoordinatorArgv(const Cell& cell, const std::string& method,
                                                 int clients, int local_steps,
                                                 const fs::path& dir) const {
  const Hyper h = s_.HyperOf(method);
  const fs::path certs = fs::absolute(s_.out / "certs");
  std::string allowed;
  for (int k = 1; k <= clients; ++k) allowed += StrCat(k > 1 ? "," : "", "client-", k);
  const std::string targets = common::StrJoin(s_.targets, ",");
  // clang-format off
  std::vector<std::string> argv = {
      (bin_ / "fedlora-server").string(),
      "--method", method, "--rounds", StrCat(s_.rounds), "--seed", StrCat(cell.seed),
      "--min-clients", StrCat(clients), "--allowed-clients", allowed,
      "--state-dir", (dir / "state").string(), "--linger-s", "1",
      "--listen", "127.0.0.1:0", "--port-file", (dir / "port").string(),
      "--tls-cert", (certs / "server.pem").string(), "--tls-key", (certs / "server.key").string(),
      "--client-ca", (certs / "ca.pem").string(),
      "--base-model-dir", model_.string(), "--eval-data", fs::absolute(data_.test).string(),
      "--eval-accuracy", "--eval-max-new-tokens", StrCat(s_.eval_max_new_tokens),
      "--eval-max-length", StrCat(s_.max_length),
      "--target-modules", targets, "--rank", StrCat(h.rank), "--lora-alpha", StrCat(h.lora_alpha),
      "--local-steps", StrCat(local_steps), "--learning-rate", StrCat(h.learning_rate)};
  // clang-format on
  if (method == "fed-sb") argv.insert(argv.end(), {"--fed-sb-init-lr", StrCat(h.fed_sb_init_lr)});
  if (!cell.client_ranks.empty()) {
    std::string ranks;
    for (size_t k = 0; k < cell.client_ranks.size(); ++k)
      ranks += StrCat(k ? "," : "", "client-", k + 1, "=", cell.client_ranks[k]);
    argv.insert(argv.end(), {"--client-ranks", ranks});
  }
  if (cell.dp_noise > 0)
    argv.insert(argv.end(),
                {"--dp-clip", StrCat(s_.dp_clip), "--dp-noise-multiplier", StrCat(cell.dp_noise)});
  return argv;
}

std::vector<std::string> Runner::ClientArgv(int k, const std::string& port,
                                            const fs::path& data) const {
  const fs::path certs = fs::absolute(s_.out / "certs");
  const std::string id = StrCat("client-", k);
  // clang-format off
  return {(bin_ / "fedlora-client").string(),
          "--coordinator", "localhost:" + port, "--ca", (certs / "ca.pem").string(),
          "--cert", (certs / (id + ".pem")).string(), "--key", (certs / (id + ".key")).string(),
          "--workload", "llm", "--model", model_.string(),
          "--data", fs::absolute(data).string(), "--batch", StrCat(s_.batch),
          "--max-length", StrCat(s_.max_length), "--threads", "1"};
  // clang-format on
}

absl::Status Runner::Federation(const Cell& cell, const std::vector<fs::path>& data,
                                const std::string& method, int local_steps, const fs::path& dir,
                                const std::string& label) {
  const int n = static_cast<int>(data.size());
  FederationPlan plan{
      .coordinator = CoordinatorArgv(cell, method, n, local_steps, dir),
      .port_file = dir / "port",
      .clients = n,
      .client = [&](int k, const std::string& port) { return ClientArgv(k, port, data[k - 1]); },
      .dir = dir,
      .label = label};
  // Progress: a line each time a round closes.
  int shown = -1;
  const auto t0 = std::chrono::steady_clock::now();
  auto progress = [&] {
    const std::string metrics =
        common::ReadFileToString(dir / "state" / "metrics.jsonl").value_or("");
    const int rounds = static_cast<int>(std::count(metrics.begin(), metrics.end(), '\n'));
    if (rounds == shown) return;
    shown = rounds;
    std::string eta;
    if (cells_run_ > 0) eta = StrCat(", about ", Clock(run_seconds_ / cells_run_), " a cell");
    std::fprintf(stderr, "%s: round %d/%d, %s in the cell, %s in all%s\n", label.c_str(), rounds,
                 s_.rounds, Clock(SecondsSince(t0)).c_str(), Clock(SecondsSince(start_)).c_str(),
                 eta.c_str());
  };
  return RunFederation(plan, progress, signals_->stop());
}

absl::Status Runner::Run(bool report_only) {
  fs::create_directories(s_.out);
  // Finished cells are reused only under the same settings: all of the spec but its grid.
  const fs::path settings = s_.out / "settings.toml";
  if (auto before = common::ReadFileToString(settings); before.ok()) {
    if (*before != s_.settings)
      return absl::FailedPreconditionError(
          StrCat(s_.out.string(), " holds cells of other settings (", settings.string(),
                 "); only [grid] may change between runs into one directory: use another out "
                 "(--out) or remove it"));
  } else {
    RETURN_IF_ERROR(common::WriteFileAtomically(settings, s_.settings));
  }
  if (!report_only) {
    signals_.emplace();
    RETURN_IF_ERROR(Prepare());
  }
  const std::vector<Cell> cells = GridCells(s_);
  if (std::find(s_.methods.begin(), s_.methods.end(), "flora") != s_.methods.end() &&
      std::any_of(s_.dp_noise.begin(), s_.dp_noise.end(), [](double z) { return z > 0; }))
    spdlog::warn(
        "flora runs without client-level DP only (the coordinator needs each client's own "
        "factors to stack them): its DP cells are left out");
  std::vector<ResultRow> rows;
  size_t finished = 0;
  for (size_t i = 0; i < cells.size(); ++i) {
    if (report_only && !fs::exists(s_.out / "cells" / cells[i].id() / "result.json")) continue;
    // ETA from the cells this process ran.
    if (!report_only && cells_run_ > 0)
      std::fprintf(stderr, "[%zu/%zu] ETA %s for the %zu cells left\n", i + 1, cells.size(),
                   Clock(run_seconds_ / cells_run_ * static_cast<double>(cells.size() - i)).c_str(),
                   cells.size() - i);
    ASSIGN_OR_RETURN(auto cell_rows, RunCell(cells[i], i, cells.size()));
    rows.insert(rows.end(), cell_rows.begin(), cell_rows.end());
    ++finished;
  }
  if (rows.empty())
    return absl::FailedPreconditionError(
        StrCat(s_.out.string(), " has no finished cell to report on; run the spec first"));
  RETURN_IF_ERROR(WriteExperimentReport(s_, rows, s_.out));
  std::fprintf(stderr, "%zu of %zu cells in %s (%d run now, %s); report in %s\n", finished,
               cells.size(), s_.out.string().c_str(), cells_run_,
               Clock(SecondsSince(start_)).c_str(), (s_.out / "report.md").string().c_str());
  return absl::OkStatus();
}

}  // namespace

absl::Status Run(const ExperimentCommandOptions& o) {
  ASSIGN_OR_RETURN(ExperimentSpec spec, ReadExperimentSpec(o.spec));
  if (!o.out.empty()) spec.out = o.out;
  if (!o.data_dir.empty()) {
    if (spec.synthetic)
      return absl::InvalidArgumentError("--data-dir: the spec's data is synthetic");
    spec.data_dir = fs::absolute(o.data_dir);
    spec.settings += StrCat("# --data-dir ", spec.data_dir.string(), "\n");
  }
  if (!o.model_dir.empty()) {
    spec.preset.clear();
    spec.model_dir = fs::absolute(o.model_dir);
    spec.settings += StrCat("# --model-dir ", spec.model_dir.string(), "\n");
  }
  Runner runner(std::move(spec));
  return runner.Run(o.report_only);
}

void AddExperimentCommand(CLI::App& app) {
  auto o = std::make_shared<ExperimentCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "experiment",
      "Run a grid of real federations (coordinator and clients on loopback over mutual TLS) and "
      "baselines from a TOML spec; write results.csv, report.md and plots");
  cmd->add_option("spec", o->spec, "TOML spec (experiments/README.md)")->required();
  cmd->add_option("--out", o->out, "results directory (default: the spec's out)");
  cmd->add_option("--data-dir", o->data_dir, "the directory of [data]'s train and test files");
  cmd->add_option("--model-dir", o->model_dir,
                  "a Hugging Face model directory instead of [model]'s (preset or dir)");
  cmd->add_flag("--report-only", o->report_only,
                "rebuild the CSV, report and plots from the finished cells, run nothing");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
