// A small synthetic instruction dataset for demos and tests of the LLM workload: six task
// categories a tiny model can learn (addition, parity, reversing, upper-casing, counting letters,
// sorting numbers), and a non-IID split across clients with category proportions drawn from a
// Dirichlet(α) per client, as federated learning papers split labelled data (Hsu et al. 2019).
// Smaller α gives each client fewer categories.
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

// Category proportions of `clients` clients, each drawn from Dirichlet(alpha, ..., alpha).
std::vector<std::vector<double>> DirichletProportions(int clients, double alpha,
                                                      std::mt19937_64& rng);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_LLM_SYNTHETIC_DATA_H_
