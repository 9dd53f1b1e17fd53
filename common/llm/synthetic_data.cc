#include "common/llm/synthetic_data.h"

#include <algorithm>
#include <cctype>

namespace fedlora::common {
namespace {

constexpr const char* kWords[] = {
    "apple",   "river",  "stone",  "cloud",  "garden", "window", "silver", "planet",
    "forest",  "candle", "bridge", "orange", "winter", "summer", "pencil", "rabbit",
    "castle",  "market", "little", "yellow", "marble", "butter", "dragon", "meadow",
    "lantern", "harbor", "violet", "copper", "falcon", "island", "kitten", "ladder",
    "mirror",  "needle", "ocean",  "pepper", "quartz", "rocket", "saddle", "tiger"};

std::string Word(std::mt19937_64& rng) { return kWords[rng() % std::size(kWords)]; }
int Number(std::mt19937_64& rng, int below) { return static_cast<int>(rng() % below); }

}  // namespace

const char* SyntheticCategoryName(int category) {
  static constexpr const char* kNames[] = {"add", "parity", "reverse", "upper", "count", "sort"};
  return kNames[category];
}

nlohmann::json SyntheticRecord(int category, std::mt19937_64& rng) {
  std::string instruction, output;
  switch (category) {
    case 0: {
      const int a = Number(rng, 50), b = Number(rng, 50);
      instruction = "What is " + std::to_string(a) + " plus " + std::to_string(b) + "?";
      output = std::to_string(a + b);
      break;
    }
    case 1: {
      const int a = Number(rng, 1000);
      instruction = "Is " + std::to_string(a) + " even or odd?";
      output = a % 2 == 0 ? "even" : "odd";
      break;
    }
    case 2: {
      const std::string w = Word(rng);
      instruction = "Reverse the word " + w + ".";
      output = std::string(w.rbegin(), w.rend());
      break;
    }
    case 3: {
      const std::string w = Word(rng);
      instruction = "Write " + w + " in capital letters.";
      output = w;
      for (char& c : output) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
      break;
    }
    case 4: {
      const std::string w = Word(rng);
      instruction = "How many letters are in " + w + "?";
      output = std::to_string(w.size());
      break;
    }
    default: {
      std::vector<int> v = {Number(rng, 100), Number(rng, 100), Number(rng, 100), Number(rng, 100)};
      instruction = "Sort from smallest to largest:";
      for (int x : v) instruction += " " + std::to_string(x);
      std::sort(v.begin(), v.end());
      for (size_t i = 0; i < v.size(); ++i) output += (i ? " " : "") + std::to_string(v[i]);
    }
  }
  return {{"instruction", instruction},
          {"input", ""},
          {"output", output},
          {"answer", output},
          {"category", SyntheticCategoryName(category)}};
}

}  // namespace fedlora::common
