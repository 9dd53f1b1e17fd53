#include "client/tool/make_data_command.h"

#include <cstdio>
#include <random>
#include <vector>

#include "client/tool/commands.h"
#include "common/base/file_util.h"
#include "common/base/partition.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/synthetic_data.h"

namespace fedlora::tool {
namespace {

// The table of records per client and category, in Markdown.
void PrintCounts(const std::vector<std::vector<int>>& counts) {
  std::printf("| client |");
  for (int c = 0; c < common::kSyntheticCategories; ++c)
    std::printf(" %s |", common::SyntheticCategoryName(c));
  std::printf("\n|---|%s\n", std::string(common::kSyntheticCategories * 4, '-').c_str());
  for (size_t k = 0; k < counts.size(); ++k) {
    std::printf("| client-%zu |", k + 1);
    for (int n : counts[k]) std::printf(" %d |", n);
    std::printf("\n");
  }
}

}  // namespace

absl::Status Run(const MakeDataCommandOptions& o) {
  std::mt19937_64 rng(o.seed);
  const auto proportions =
      common::PerClientLabelProportions(o.clients, common::kSyntheticCategories, o.alpha, rng);
  std::vector<std::string> files;
  std::vector<std::vector<int>> counts(static_cast<size_t>(o.clients),
                                       std::vector<int>(common::kSyntheticCategories, 0));
  for (int k = 0; k < o.clients; ++k) {
    std::discrete_distribution<int> pick(proportions[k].begin(), proportions[k].end());
    std::string text;
    for (int i = 0; i < o.records; ++i) {
      const int category = pick(rng);
      ++counts[k][category];
      text += common::SyntheticRecord(category, rng).dump() + "\n";
    }
    files.push_back(std::move(text));
  }
  std::string test;
  for (int i = 0; i < o.test_records; ++i)
    test += common::SyntheticRecord(i % common::kSyntheticCategories, rng).dump() + "\n";
  RETURN_IF_ERROR(common::BuildDirectoryAtomically(
      o.out, o.overwrite, [&](const std::filesystem::path& dir) -> absl::Status {
        for (int k = 0; k < o.clients; ++k)
          RETURN_IF_ERROR(
              common::WriteFileSynced(dir / common::StrCat("client-", k + 1, ".jsonl"), files[k]));
        return common::WriteFileSynced(dir / "test.jsonl", test);
      }));
  std::printf(
      "wrote %s: %d clients × %d records (Dirichlet α = %g over %d categories), %d test records\n",
      o.out.c_str(), o.clients, o.records, o.alpha, common::kSyntheticCategories, o.test_records);
  PrintCounts(counts);
  return absl::OkStatus();
}

void AddMakeDataCommand(CLI::App& app) {
  auto o = std::make_shared<MakeDataCommandOptions>();
  CLI::App* cmd = app.add_subcommand(
      "make-data",
      "Write a synthetic instruction dataset split non-IID across clients (client-<k>.jsonl, "
      "test.jsonl)");
  cmd->add_option("--out", o->out, "directory to write")->required();
  cmd->add_option("--clients", o->clients, "number of clients")
      ->capture_default_str()
      ->check(CLI::Range(1, 100000));
  cmd->add_option("--records", o->records, "records per client")
      ->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  cmd->add_option("--test-records", o->test_records, "held-out records, every category alike")
      ->capture_default_str()
      ->check(CLI::Range(1, 10000000));
  cmd->add_option("--alpha", o->alpha, "Dirichlet concentration (small: more skewed)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  cmd->add_option("--seed", o->seed, "random seed")->capture_default_str();
  cmd->add_flag("--overwrite", o->overwrite, "replace --out if it exists");
  cmd->callback([o] { ExitIfError(Run(*o)); });
}

}  // namespace fedlora::tool
