// Helpers shared by fedlora's tests: random adapters, dense reference computations done
// independently of the code under test (plain double-precision products of the factors), and
// scratch directories.
#ifndef FEDLORA_TESTS_TEST_UTIL_H_
#define FEDLORA_TESTS_TEST_UTIL_H_

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/llm/llama_config.h"
#include "common/tensor/adapter.h"
#include "tests/scratch_dir.h"

namespace fedlora::testing {

using common::Adapter;
using common::MatrixD;

// The last line of a program's output that is a JSON object — its --json summary, which may hold
// nested objects, so the last '{' is not where it starts — or null when there is none.
inline nlohmann::json LastJsonLine(const std::string& output) {
  std::istringstream lines(output);
  std::string line, last;
  while (std::getline(lines, line))
    if (line.starts_with('{')) last = line;
  return last.empty() ? nlohmann::json() : nlohmann::json::parse(last);
}

struct ModuleSpec {
  std::string name;
  int rank, n, m;
  double scaling = 1.0;
  bool has_r = false;
};

// An adapter with entries drawn i.i.d. from N(0, 1/n) for A, N(0, 1) for B and R.
inline Adapter RandomAdapter(const std::vector<ModuleSpec>& specs, uint64_t seed) {
  std::vector<common::ModuleShape> shapes;
  for (const ModuleSpec& s : specs)
    shapes.push_back({s.name, s.rank, s.n, s.m, s.scaling, s.has_r});
  Adapter a = *Adapter::Create(shapes);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (size_t i = 0; i < a.num_modules(); ++i) {
    const float sa = 1.0f / std::sqrt(static_cast<float>(a.module(i).in_features));
    for (float& x : a.A(i).reshaped()) x = sa * normal(rng);
    for (float& x : a.B(i).reshaped()) x = normal(rng);
    if (a.module(i).has_r) {
      for (float& x : a.R(i).reshaped()) x = normal(rng);
    }
  }
  return a;
}

// A Llama config small enough for training tests: width 32, 2 layers, GQA 4:2, head_dim 8.
inline common::LlamaConfig TinyLlama(int vocab, bool tied = true) {
  common::LlamaConfig c;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.head_dim = 8;
  c.vocab_size = vocab;
  c.max_position_embeddings = 128;
  c.tie_word_embeddings = tied;
  return c;
}

// The dense m×n effective delta s·B·A (or s·B·R·A) of module i, in double.
inline MatrixD DenseDelta(const Adapter& a, size_t i) {
  MatrixD b = a.B(i).cast<double>();
  if (a.module(i).has_r) b = b * a.R(i).cast<double>();
  return a.module(i).scaling * b * a.A(i).cast<double>();
}

inline double RelativeDiff(const MatrixD& x, const MatrixD& y) {
  return (x - y).norm() / std::max(y.norm(), 1e-300);
}

// ε of `steps` Gaussian mechanisms of noise multiplier σ at sampling rate 1 — RDP α/(2σ²) each —
// over Opacus' orders, with the conversion of Balle et al. 2020 (../shared/ALGORITHMS.md): what the
// accountant must report for full-batch steps, computed without it.
inline double EpsilonAtFullBatch(double sigma, double steps, double delta) {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  double best = std::numeric_limits<double>::infinity();
  for (double a : orders) {
    const double rdp = steps * a / (2 * sigma * sigma);
    best = std::min(best, rdp + std::log((a - 1) / a) - (std::log(delta) + std::log(a)) / (a - 1));
  }
  return best;
}

// Holds odd-sized heap blocks, every other one freed again, so that what is allocated next lands
// at other addresses (and alignments) than before: for tests of results that must not depend on
// where the heap puts a buffer.
class HeapShift {
 public:
  explicit HeapShift(uint64_t seed) {
    std::mt19937_64 rng(seed);
    for (int i = 0; i < 96; ++i) blocks_.emplace_back(new char[1 + rng() % 4093]);
    for (size_t i = 0; i < blocks_.size(); i += 2) blocks_[i].reset();
  }

 private:
  std::vector<std::unique_ptr<char[]>> blocks_;
};

}  // namespace fedlora::testing

#endif  // FEDLORA_TESTS_TEST_UTIL_H_
