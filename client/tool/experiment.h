// `fedlora experiment SPEC`: a grid of real federations (a coordinator and N client processes on
// loopback over mutual TLS) and their baselines, from a TOML spec to a tidy CSV, a Markdown report
// and plots. The spec's format is in experiments/README.md; experiments/quick.toml is an example.
#ifndef FEDLORA_CLIENT_TOOL_EXPERIMENT_H_
#define FEDLORA_CLIENT_TOOL_EXPERIMENT_H_

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace fedlora::tool {

// What a method trains with (per method in the spec's [method.<name>], over [train]'s values).
struct Hyper {
  int rank = 8;
  double lora_alpha = 16;
  double learning_rate = 0.01;
  double fed_sb_init_lr = 1e-3;  // fed-sb only
};

struct ExperimentSpec {
  std::string name;
  std::filesystem::path out;

  // [model]: a preset `fedlora init-model` makes (random weights, a tokenizer learned from the
  // training data), or a Hugging Face directory.
  std::string preset;
  std::filesystem::path model_dir;
  uint64_t model_seed = 1;
  double init_std = 0.1;
  int merges = 200;

  // [data]: synthetic records (`fedlora make-data`'s six categories), or JSONL files of a
  // directory. Partition: "dirichlet" over label_field (per label, client shares ~ Dir(α)), or
  // "per-file" (client k holds train file k).
  bool synthetic = false;
  int synthetic_records = 120;  // per client
  int synthetic_test_records = 60;
  std::filesystem::path data_dir;
  std::vector<std::string> train_files, test_files;
  std::string partition = "dirichlet";
  std::string label_field = "category";
  int max_train_records = 0;  // per train file, a fixed random subset; 0: all
  int max_test_records = 0;   // per test file

  // [grid]
  std::vector<std::string> methods;
  std::vector<uint64_t> seeds = {1};
  std::vector<int> clients = {4};
  std::vector<double> alphas = {0.5};
  std::vector<double> dp_noise = {0};  // client-level DP noise multiplier; 0: off
  // FLoRA's heterogeneous setting: per pattern, flora cells whose client k trains rank
  // pattern[(k − 1) mod size] (fedlora-server --client-ranks).
  std::vector<std::vector<int>> flora_client_ranks;
  int rounds = 3;
  int local_steps = 10;

  // [train], and [method.<name>] overrides of its rank / lora_alpha / learning_rate.
  std::vector<std::string> targets = {"q_proj", "v_proj"};
  int batch = 8;
  int max_length = 256;
  int eval_max_new_tokens = 16;
  double dp_clip = 0.5;
  Hyper train;
  std::map<std::string, Hyper> per_method;

  // [baselines]
  bool centralised = true;
  bool local = true;

  // The spec without its [grid], as TOML: what cells of one results directory share.
  std::string settings;

  Hyper HyperOf(const std::string& method) const {
    auto it = per_method.find(method);
    return it == per_method.end() ? train : it->second;
  }
};

// Reads and checks a spec; relative paths in it are relative to the spec file's directory. An
// unknown key is an error that names it.
absl::StatusOr<ExperimentSpec> ReadExperimentSpec(const std::filesystem::path& path);

// One run of the grid. kind: a method, "centralised" (one site with the pooled data and the
// federation's total steps) or "local" (site `site` alone).
struct Cell {
  std::string kind;
  uint64_t seed = 0;
  int clients = 0;
  std::string split;  // "dirichlet-0.5" or "per-file"
  double alpha = 0;
  double dp_noise = 0;
  std::vector<int> client_ranks;  // flora: each client's rank; empty: the method's rank for all
  int site = 0;                   // local: 1-based client index

  std::string id() const;
};

// One CSV row: a cell after a round.
struct ResultRow {
  Cell cell;
  int round = 0;
  double eval_loss = 0;
  std::optional<double> eval_accuracy;
  std::map<std::string, double> accuracy_by_task;  // when the held-out records name tasks
  double bytes_up = 0, bytes_down = 0;             // this round, mean per client that took part
  double cumulative_bytes = 0;    // up + down per client since the start (Fed-SB's init too)
  std::optional<double> epsilon;  // client-level DP's ε, or the largest DP-SGD ε
  double round_seconds = 0, wall_seconds = 0;
};

// Runs a program (found on PATH unless the name has a slash) to its end, in `cwd` when given,
// stdout and stderr into `log`; an exit other than 0 is an error quoting the log's end.
absl::Status RunToEnd(const std::vector<std::string>& argv, const std::filesystem::path& log,
                      const std::filesystem::path& cwd = {});

// Writes results.csv, results_by_task.csv (when the held-out records name tasks), report.md and
// (with gnuplot) loss.svg, accuracy.svg and
// accuracy_vs_bytes.svg into `out`, each atomically.
absl::Status WriteExperimentReport(const ExperimentSpec& spec, const std::vector<ResultRow>& rows,
                                   const std::filesystem::path& out);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPERIMENT_H_
