// aggregate_bench: times `fedlora aggregate` as whole processes (wall time and peak RSS of the
// child, from wait4)
//   A. at Llama-7B q_proj/v_proj shapes: 32 layers × 2 modules of 4096×4096, r = 16, 10 clients,
//   every method; B. LoRA-FAIR on one 1024×1024 module with 10 clients, next to lora_fair_dense
//   (the paper's dense solver).
//   C. the coordinator's round close at the shapes of A: its accumulator folds the accepted
//   updates in client order, reading each back from the state store (what makes a round's result
//   the same bytes whatever order updates arrive in), against the streamed sums it kept before
//   (each update added as it arrived, only the mean left for the close).
// Inputs are made once with `fedlora random-adapter` under --work and reused. Prints Markdown
// tables.
#include <fcntl.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>

#include "common/aggregation/aggregate.h"
#include "common/tensor/blob.h"
#include "server/accumulate/weighted_mean.h"
#include "server/intake/update_gate.h"
#include "server/state_store.h"
#include "tests/process.h"

namespace {

namespace fs = std::filesystem;

struct Run {
  double seconds = 0;
  double max_rss_mb = 0;
  std::string output;
};

// Runs argv to completion with stdout and stderr captured (testing::Start), timing it and reading
// the child's peak RSS from wait4; exits the benchmark if it fails.
Run Spawn(const std::vector<std::string>& argv, const fs::path& log) {
  fs::remove(log);
  const auto start = std::chrono::steady_clock::now();
  const pid_t pid = fedlora::testing::Start(argv, log);
  if (pid < 0) {
    std::fprintf(stderr, "cannot start %s\n", argv[0].c_str());
    std::exit(1);
  }
  int status;
  struct rusage usage;
  wait4(pid, &status, 0, &usage);
  Run run;
  run.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  run.max_rss_mb = usage.ru_maxrss / 1024.0;
  run.output = fedlora::testing::ReadText(log);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    std::fprintf(stderr, "command failed: %s\n%s\n", argv[0].c_str(), run.output.c_str());
    std::exit(1);
  }
  return run;
}

double DirMegabytes(const std::vector<std::string>& dirs) {
  uintmax_t bytes = 0;
  for (const auto& d : dirs) {
    for (const auto& e : fs::directory_iterator(d)) bytes += e.file_size();
  }
  return bytes / 1e6;
}

struct Setup {
  std::string bin;
  fs::path work;
  int repeat = 3;
};

std::vector<std::string> MakeClients(const Setup& s, const std::string& group, int clients,
                                     const std::vector<std::string>& shape) {
  std::vector<std::string> dirs;
  for (int k = 0; k < clients; ++k) {
    const fs::path dir = s.work / group / ("client" + std::to_string(k));
    if (!fs::exists(dir)) {
      std::vector<std::string> argv = {s.bin + "/fedlora", "random-adapter", "--out",
                                       dir.string(),       "--seed",         std::to_string(k + 1)};
      argv.insert(argv.end(), shape.begin(), shape.end());
      Spawn(argv, s.work / "log.txt");
    }
    dirs.push_back(dir.string());
  }
  return dirs;
}

// Best of `repeat` runs for time; worst for peak RSS.
Run Measure(const Setup& s, std::vector<std::string> argv) {
  Run best;
  best.seconds = 1e300;
  for (int i = 0; i < s.repeat; ++i) {
    Run r = Spawn(argv, s.work / "log.txt");
    best.max_rss_mb = std::max(best.max_rss_mb, r.max_rss_mb);
    if (r.seconds < best.seconds) {
      best.seconds = r.seconds;
      best.output = r.output;
    }
  }
  return best;
}

void LlamaShapes(const Setup& s, int clients, int layers, int dim, int rank) {
  const std::vector<std::string> shape = {
      "--layers",      std::to_string(layers), "--targets",      "q_proj,v_proj",
      "--in-features", std::to_string(dim),    "--out-features", std::to_string(dim),
      "--rank",        std::to_string(rank),   "--alpha",        std::to_string(2 * rank)};
  std::vector<std::string> sb_shape = shape;
  sb_shape.insert(sb_shape.end(), {"--lora-sb", "--frozen-seed", "7"});
  const auto plain = MakeClients(s, "llama", clients, shape);
  const auto sb = MakeClients(s, "llama-sb", clients, sb_shape);
  std::printf("\n### A. %d clients, %d layers x q_proj,v_proj (%dx%d), r = %d\n\n", clients, layers,
              dim, dim, rank);
  std::printf("inputs: %.1f MB of LoRA adapters (f32), %.1f MB of LoRA-SB adapters\n\n",
              DirMegabytes(plain), DirMegabytes(sb));
  std::printf(
      "| method | wall time (s) | peak RSS (MB) | output rank | max rel. error vs dW* "
      "|\n|---|---|---|---|---|\n");
  for (const char* method : {"fedit", "flora", "lora-fair", "fed-sb"}) {
    std::vector<std::string> argv = {s.bin + "/fedlora",
                                     "aggregate",
                                     "--method",
                                     method,
                                     "--force",
                                     "--json",
                                     "--out",
                                     (s.work / ("out-" + std::string(method))).string()};
    const auto& in = std::string(method) == "fed-sb" ? sb : plain;
    argv.insert(argv.end(), in.begin(), in.end());
    Run r = Measure(s, argv);
    auto report =
        nlohmann::json::parse(r.output.substr(r.output.rfind('{', r.output.rfind("\"method\""))));
    std::printf("| %s | %.2f | %.0f | %d | %.2e |\n", method, r.seconds, r.max_rss_mb,
                report["rank"].get<int>(), report["max_relative_error"].get<double>());
    std::fflush(stdout);
  }
}

double ParseObjective(const std::string& output) {
  return std::stod(output.substr(output.find("objective ") + 10));
}

void LoraFairVersusDense(const Setup& s, int clients, int dim, int rank,
                         const std::string& python) {
  const std::vector<std::string> shape = {"--layers",       "1",
                                          "--targets",      "q_proj",
                                          "--in-features",  std::to_string(dim),
                                          "--out-features", std::to_string(dim),
                                          "--rank",         std::to_string(rank),
                                          "--alpha",        std::to_string(2 * rank)};
  const auto in = MakeClients(s, "fair", clients, shape);
  std::vector<std::string> ours = {
      s.bin + "/fedlora", "aggregate", "--method", "lora-fair",
      "--force",          "--json",    "--out",    (s.work / "out-fair").string()};
  ours.insert(ours.end(), in.begin(), in.end());
  std::vector<std::string> dense = {s.bin + "/lora_fair_dense"};
  dense.insert(dense.end(), in.begin(), in.end());
  Run a = Measure(s, ours);
  Run b = Measure(s, dense);
  auto report =
      nlohmann::json::parse(a.output.substr(a.output.rfind('{', a.output.rfind("\"method\""))));
  const auto& m = report["modules"][0];
  std::printf("\n### B. LoRA-FAIR, one %dx%d module, %d clients, r = %d, lambda 0.01\n\n", dim, dim,
              clients, rank);
  std::printf(
      "| solver | wall time (s) | peak RSS (MB) | objective | iterations "
      "|\n|---|---|---|---|---|\n");
  std::printf("| fedlora aggregate (low-rank L-BFGS) | %.3f | %.0f | %.9f | %d |\n", a.seconds,
              a.max_rss_mb, m["objective"].get<double>(), m["iterations"].get<int>());
  std::printf(
      "| dense C++ (Eigen f32, 2 threads; 1000 GD steps, lr 0.01) | %.3f | %.0f | %.9f | 1000 |\n",
      b.seconds, b.max_rss_mb, ParseObjective(b.output));
  Run c;
  if (!python.empty()) {
    // The paper's own way: PyTorch autograd + SGD. One run: it is slow.
    std::vector<std::string> torch = {
        python, std::string(FEDLORA_SOURCE_DIR) + "/tests/bench/lora_fair_torch.py"};
    torch.insert(torch.end(), in.begin(), in.end());
    c = Spawn(torch, s.work / "log.txt");
    std::printf(
        "| dense PyTorch (autograd + SGD, 2 threads; 1000 steps, lr 0.01) | %.3f | %.0f | %.9f | "
        "1000 |\n",
        c.seconds, c.max_rss_mb, ParseObjective(c.output));
  }
  std::printf("| FedIT (dB = 0) | | | %.9f | |\n", m["fedit_objective"].get<double>());
  std::printf("\nspeed-up as whole processes: %.0fx over dense C++", b.seconds / a.seconds);
  if (!python.empty()) std::printf(", %.0fx over PyTorch", c.seconds / a.seconds);
  std::printf("\n");
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// C: a FedIT round of `clients` updates at Llama shapes, closed by the coordinator's accumulator.
void CoordinatorClose(const Setup& s, int clients, int layers, int dim, int rank) {
  namespace server = fedlora::server;
  namespace common = fedlora::common;
  server::ServerOptions options;
  options.method = common::Method::kFedIt;
  options.rank = rank;
  options.lora_alpha = 2.0 * rank;
  const fs::path dir = s.work / "close";
  fs::remove_all(dir);
  auto store = server::StateStore::Open(dir, common::Env::Default());
  if (!store.ok()) std::exit(1);
  std::vector<common::ModuleShape> shapes, scaled;
  for (int l = 0; l < layers; ++l)
    for (const char* m : {"q_proj", "v_proj"}) {
      const std::string name = "model.layers." + std::to_string(l) + ".self_attn." + m;
      shapes.push_back({name, rank, dim, dim, 1.0, false});
      scaled.push_back({name, rank, dim, dim, 2.0, false});
    }
  std::vector<server::AcceptedUpdate> accepted;
  std::vector<common::Adapter> in_memory;
  for (int k = 0; k < clients; ++k) {
    common::Adapter u = *common::Adapter::Create(scaled);
    std::mt19937_64 rng(k + 1);
    std::normal_distribution<float> normal(0.0f, 0.01f);
    for (float& x : u.values()) x = normal(rng);
    const auto blob = store->PutBlob(common::EncodeAdapter(u), server::BlobKind::kAdapter, 1);
    accepted.push_back({"client-" + std::to_string(100 + k), blob->sha256, 100 + k, 0});
    in_memory.push_back(std::move(u));
  }
  const server::UpdateGate gate(&options, &*store, shapes, std::make_shared<common::Adapter>(),
                                std::nullopt, 1e18);
  double streamed_add = 1e300, streamed_mean = 1e300, ordered = 1e300;
  for (int i = 0; i < s.repeat; ++i) {
    common::StreamingAverage sums(options.method, shapes, nullptr);
    auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < clients; ++k) sums.Add(in_memory[k], static_cast<double>(100 + k));
    streamed_add = std::min(streamed_add, SecondsSince(t0));
    t0 = std::chrono::steady_clock::now();
    (void)sums.Mean();
    streamed_mean = std::min(streamed_mean, SecondsSince(t0));
    server::WeightedMean mean(options.method, shapes, nullptr);
    t0 = std::chrono::steady_clock::now();
    if (!mean.Aggregate(accepted, gate).ok()) std::exit(1);
    ordered = std::min(ordered, SecondsSince(t0));
  }
  std::printf(
      "\n## C. The coordinator's close of a FedIT round: %d updates of %d layers × q,v %dx%d, "
      "r = %d (%.0f MB each)\n\n",
      clients, layers, dim, dim, rank, fs::file_size(dir / "blobs" / accepted[0].sha256) / 1e6);
  std::printf("| | folding during the round, s | close, s |\n|---|---|---|\n");
  std::printf("| streamed in arrival order (before) | %.3f | %.3f |\n", streamed_add,
              streamed_mean);
  std::printf("| folded in client order from the store (now) | 0 | %.3f |\n", ordered);
  std::printf(
      "\nthe ordered fold reads and decodes every update again at the close: %.2fx the "
      "streamed work\n",
      ordered / (streamed_add + streamed_mean));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Benchmarks of fedlora aggregate as whole processes"};
  Setup s;
  s.bin = FEDLORA_BIN_DIR;
  std::string work = "out/bench";
  int clients = 10, layers = 32, dim = 4096, rank = 16, fair_dim = 1024;
  bool skip_llama = false, skip_fair = false, skip_close = false;
  std::string python;
  app.add_option("--work", work, "where inputs are made and kept")->capture_default_str();
  app.add_option("--bin", s.bin, "directory with fedlora and lora_fair_dense")
      ->capture_default_str();
  app.add_option("--repeat", s.repeat, "runs per measurement (best time, worst RSS)")
      ->capture_default_str();
  app.add_option("--clients", clients)->capture_default_str();
  app.add_option("--layers", layers)->capture_default_str();
  app.add_option("--dim", dim)->capture_default_str();
  app.add_option("--rank", rank)->capture_default_str();
  app.add_option("--fair-dim", fair_dim)->capture_default_str();
  app.add_flag("--skip-llama", skip_llama);
  app.add_flag("--skip-fair", skip_fair);
  app.add_flag("--skip-close", skip_close);
  app.add_option("--torch-python", python,
                 "a python with torch (e.g. /usr/bin/python3 with python3-torch) to also "
                 "time the PyTorch peer");
  CLI11_PARSE(app, argc, argv);
  s.work = work;
  fs::create_directories(s.work);
  std::printf("machine: %ld cores\n", sysconf(_SC_NPROCESSORS_ONLN));
  if (!skip_llama) LlamaShapes(s, clients, layers, dim, rank);
  if (!skip_fair) LoraFairVersusDense(s, clients, fair_dim, rank, python);
  if (!skip_close) CoordinatorClose(s, clients, layers, dim, rank);
  return 0;
}
