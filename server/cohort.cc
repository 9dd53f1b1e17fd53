#include "server/cohort.h"

#include <algorithm>
#include <cmath>
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

}  // namespace fedlora::server
