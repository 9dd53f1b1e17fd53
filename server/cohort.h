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

// The members that must deliver for a round to close at its deadline: ⌈quorum·members⌉, at least
// 1, computed so that binary rounding cannot push an exact product past an integer (0.1·30 is
// 3.0000000000000004 in double; this says 3).
size_t QuorumOf(double quorum, size_t members);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_COHORT_H_
