#include "common/base/partition.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "common/base/strings.h"

namespace fedlora::common {
namespace {

// A Dirichlet draw from `gamma` (shape α, scale 1). The caller keeps one sampler for a run of
// draws: std::gamma_distribution holds state between calls (a spare normal deviate), so which
// draws share a sampler decides the stream of values for a seed.
std::vector<double> DrawDirichlet(int n, std::gamma_distribution<double>& gamma,
                                  std::mt19937_64& rng) {
  std::vector<double> p;
  p.reserve(static_cast<size_t>(n));
  double sum = 0;
  for (int i = 0; i < n; ++i) sum += p.emplace_back(gamma(rng));
  if (sum <= 0) {  // every draw underflowed (tiny α): all mass on one coordinate
    p.assign(static_cast<size_t>(n), 0.0);
    p[rng() % static_cast<uint64_t>(n)] = 1.0;
    return p;
  }
  for (double& x : p) x /= sum;
  return p;
}

}  // namespace

std::vector<double> DirichletSample(int n, double alpha, std::mt19937_64& rng) {
  std::gamma_distribution<double> gamma(alpha, 1.0);
  return DrawDirichlet(n, gamma, rng);
}

std::vector<std::vector<double>> PerClientLabelProportions(int clients, int labels, double alpha,
                                                           std::mt19937_64& rng) {
  std::gamma_distribution<double> gamma(alpha, 1.0);
  std::vector<std::vector<double>> out;
  for (int k = 0; k < clients; ++k) out.push_back(DrawDirichlet(labels, gamma, rng));
  return out;
}

absl::StatusOr<std::vector<std::vector<size_t>>> SplitByLabelShares(
    const std::vector<std::string>& labels, int clients, double alpha, size_t min_per_client,
    uint64_t seed) {
  std::map<std::string, std::vector<size_t>> by_label;
  for (size_t i = 0; i < labels.size(); ++i) by_label[labels[i]].push_back(i);
  std::mt19937_64 rng(seed);
  for (int attempt = 0; attempt < 100; ++attempt) {
    std::vector<std::vector<size_t>> split(static_cast<size_t>(clients));
    for (const auto& [label, items] : by_label) {
      const std::vector<double> share = DirichletSample(clients, alpha, rng);
      std::vector<size_t> order = items;
      std::shuffle(order.begin(), order.end(), rng);
      double cumulative = 0;
      size_t begin = 0;
      for (int k = 0; k < clients; ++k) {
        cumulative += share[k];
        const size_t end =
            k + 1 == clients
                ? order.size()
                : std::min(order.size(),
                           static_cast<size_t>(std::llround(cumulative * order.size())));
        for (size_t i = begin; i < end; ++i) split[k].push_back(order[i]);
        begin = std::max(begin, end);
      }
    }
    if (std::all_of(split.begin(), split.end(),
                    [&](const auto& part) { return part.size() >= min_per_client; }))
      return split;
  }
  return absl::InvalidArgumentError(StrCat("no Dirichlet(", alpha, ") split of ", labels.size(),
                                           " records over ", clients,
                                           " clients gave each at least ", min_per_client,
                                           " in 100 draws; use more records or a larger alpha"));
}

}  // namespace fedlora::common
