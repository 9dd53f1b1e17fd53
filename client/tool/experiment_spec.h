// The spec of `fedlora experiment` (experiment_command.h): a TOML file naming the model, the data
// and its partition, the grid of federations and their training settings, and the baselines. Its
// format is in experiments/README.md; experiments/quick.toml is an example. And the grid's cells:
// one federation (or baseline) each.
#ifndef FEDLORA_CLIENT_TOOL_EXPERIMENT_SPEC_H_
#define FEDLORA_CLIENT_TOOL_EXPERIMENT_SPEC_H_

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <map>
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
  // directory. Partition: "dirichlet" over label_field (per-label client shares ~ Dir(α),
  // common/base/partition.h), or "per-file" (client k holds train file k).
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

  // The largest federation of the grid (the spec holds at least one client count).
  int max_clients() const { return *std::max_element(clients.begin(), clients.end()); }
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
  std::string split;  // "dirichlet0.5" or "per-file"
  double alpha = 0;
  double dp_noise = 0;
  std::vector<int> client_ranks;  // flora: each client's rank; empty: the method's rank for all
  int site = 0;                   // local: 1-based client index

  std::string id() const;
};

// The grid's cells in the order they run: per seed, clients and alpha, every method at every DP
// noise (flora without DP: the coordinator needs each client's own factors to stack them), the
// FLoRA rank patterns, then the baselines.
std::vector<Cell> GridCells(const ExperimentSpec& spec);

}  // namespace fedlora::tool

#endif  // FEDLORA_CLIENT_TOOL_EXPERIMENT_SPEC_H_
