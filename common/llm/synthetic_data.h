// A small synthetic instruction dataset for demos and tests of the LLM workload: six task
// categories a tiny model can learn (addition, parity, reversing, upper-casing, counting letters,
// sorting numbers). `fedlora make-data` splits it non-IID across clients with per-client category
// proportions ~ Dirichlet(α) (common/base/partition.h); smaller α gives each client fewer
// categories.
#ifndef FEDLORA_COMMON_LLM_SYNTHETIC_DATA_H_
#define FEDLORA_COMMON_LLM_SYNTHETIC_DATA_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <random>
#include <string>
#include <vector>

namespace fedlora::common {

inline constexpr int kSyntheticCategories = 6;
const char* SyntheticCategoryName(int category);

// One {"instruction", "input", "output", "answer", "category"} record of the category (the answer
// is the output, for exact-match accuracy).
nlohmann::json SyntheticRecord(int category, std::mt19937_64& rng);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_SYNTHETIC_DATA_H_
