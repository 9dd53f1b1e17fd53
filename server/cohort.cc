#include "server/cohort.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

namespace fedlora::server {

std::vector<std::string> SampleCohort(std::vector<std::string> candidates, uint64_t seed,
                                      int64_t round, int attempt, double fraction, int min_cohort) {
  std::sort(candidates.begin(), candidates.end());  // the shuffle starts from a known order
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(round), static_cast<uint32_t>(attempt)};
  std::mt19937_64 rng(seq);
  std::shuffle(candidates.begin(), candidates.end(), rng);
  const int n = static_cast<int>(candidates.size());
  const int k =
      std::clamp(static_cast<int>(std::ceil(fraction * n - 1e-9)), std::min(min_cohort, n), n);
  candidates.resize(static_cast<size_t>(k));
  std::sort(candidates.begin(), candidates.end());
  return candidates;
}

size_t QuorumOf(double quorum, size_t members) {
  const auto needed =
      static_cast<size_t>(std::max(0.0, std::ceil(quorum * static_cast<double>(members) - 0.05)));
  return std::clamp<size_t>(needed, 1, std::max<size_t>(members, 1));
}

double WeightCap(std::vector<int64_t> examples, double max_share) {
  constexpr double kNone = std::numeric_limits<double>::infinity();
  if (examples.empty() || max_share >= 1) return kNone;
  std::sort(examples.begin(), examples.end());
  const size_t m = examples.size();
  double below = 0;  // Σ of the m − k smallest
  for (int64_t n : examples) below += static_cast<double>(n);
  if (static_cast<double>(examples.back()) <= max_share * below) return kNone;
  for (size_t k = 1; k < m; ++k) {
    below -= static_cast<double>(examples[m - k]);
    if (max_share * static_cast<double>(k) >= 1) break;
    const double t = max_share * below / (1 - max_share * static_cast<double>(k));
    const double next = static_cast<double>(examples[m - k - 1]);
    if (t >= next && t <= static_cast<double>(examples[m - k])) return t;
  }
  return static_cast<double>(examples.front());
}

}  // namespace fedlora::server
