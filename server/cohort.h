// Cohort sampling and the quorum: which clients train in a round, and how many of them must
// deliver for the round to close at its deadline.
#ifndef FEDLORA_SERVER_COHORT_H_
#define FEDLORA_SERVER_COHORT_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fedlora::server {

// The cohort of attempt `attempt` of round `round`: `candidates` shuffled by a generator seeded
// with (seed, round, attempt), of which the first k = clamp(⌈fraction·n⌉, min(min_cohort, n), n)
// are taken; returned sorted. The same arguments give the same cohort, so a run repeats.
std::vector<std::string> SampleCohort(std::vector<std::string> candidates, uint64_t seed,
                                      int64_t round, int attempt, double fraction, int min_cohort);

// The members that must deliver for a round to close at its deadline: ⌈quorum·members − 0.05⌉,
// at least 1. The 0.05 forgives a quorum written to two decimals (0.67 of 3 members is 2.01: 2
// members, as meant) and binary rounding (0.1·30 is 3.0000000000000004 in double: 3), and never
// forgives a twentieth of a member more.
size_t QuorumOf(double quorum, size_t members);

// The per-client weight cap T of a cohort whose members joined with `examples`: each update's
// aggregation weight is min(its examples, T), with T the largest value for which no member's share
// T / Σ_j min(n_j, T) exceeds `max_share` (water-filling: T = c·S / (1 − c·k) when the k largest
// are capped and S is the sum of the others). Infinite when no one needs capping or max_share ≥ 1;
// the smallest count when max_share < 1 / members (equal weights are the best there is).
double WeightCap(std::vector<int64_t> examples, double max_share);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_COHORT_H_
