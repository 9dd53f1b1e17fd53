#include "client/tool/experiment_partition.h"

#include <algorithm>
#include <nlohmann/json.hpp>
#include <random>

#include "client/tool/experiment_processes.h"
#include "common/base/file_util.h"
#include "common/base/partition.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/dataset.h"

namespace fedlora::tool {

using common::StrCat;
namespace fs = std::filesystem;

namespace {

// The records of a JSONL file (a fixed random subset of `limit` when limit > 0 and fewer than
// the file has: the same for every cell and seed). With `tag_task`, a record without a "task" or
// "category" gets "task": the file's name without "-test" (held-out records, for the
// coordinator's accuracy per task).
absl::StatusOr<std::vector<Record>> ReadRecords(const fs::path& path,
                                                const std::string& label_field, int limit,
                                                bool tag_task = false) {
  std::string task = path.stem().string();
  if (task.ends_with("-test") || task.ends_with("_test")) task.resize(task.size() - 5);
  std::vector<Record> records;
  RETURN_IF_ERROR(common::ForEachJsonRecord(
      path, [&](const nlohmann::json& r, const std::string& where) -> absl::Status {
        if (!r.is_object()) return absl::InvalidArgumentError(where + ": expected a JSON object");
        std::string label = path.filename().string();
        if (auto it = r.find(label_field); it != r.end())
          label = it->is_string() ? it->get<std::string>() : it->dump();
        if (!tag_task || r.contains("task") || r.contains("category")) {
          records.push_back({r.dump(), std::move(label)});
          return absl::OkStatus();
        }
        nlohmann::json tagged = r;
        tagged["task"] = task;
        records.push_back({tagged.dump(), std::move(label)});
        return absl::OkStatus();
      }));
  if (records.empty()) return absl::InvalidArgumentError(StrCat(path.string(), " has no records"));
  if (limit > 0 && static_cast<size_t>(limit) < records.size()) {
    std::mt19937_64 rng(0);
    std::shuffle(records.begin(), records.end(), rng);
    records.resize(static_cast<size_t>(limit));
  }
  return records;
}

// The pool split by per-label client shares ~ Dirichlet(α) (common::SplitByLabelShares), each
// client holding at least `min_records`.
absl::StatusOr<std::vector<std::vector<Record>>> SplitPool(const std::vector<Record>& pool,
                                                           int clients, double alpha,
                                                           size_t min_records, uint64_t seed) {
  std::vector<std::string> labels;
  for (const Record& r : pool) labels.push_back(r.label);
  ASSIGN_OR_RETURN(const std::vector<std::vector<size_t>> indices,
                   common::SplitByLabelShares(labels, clients, alpha, min_records, seed));
  std::vector<std::vector<Record>> split(indices.size());
  for (size_t k = 0; k < indices.size(); ++k)
    for (size_t i : indices[k]) split[k].push_back(pool[i]);
  return split;
}

}  // namespace

std::string Lines(const std::vector<Record>& records) {
  std::string text;
  for (const Record& r : records) text += r.line + "\n";
  return text;
}

absl::StatusOr<ExperimentData> PrepareData(const ExperimentSpec& s, const fs::path& bin) {
  const fs::path data = s.out / "data";
  fs::create_directories(data);
  ExperimentData prepared;
  std::vector<Record> test;
  if (s.synthetic) {
    // One pool of uniform categories (a huge α) for the split to skew.
    const fs::path pool = data / "synthetic";
    if (!fs::exists(pool / "test.jsonl"))
      RETURN_IF_ERROR(RunToEnd(
          {(bin / "fedlora").string(), "make-data", "--out", pool.string(), "--clients", "1",
           "--records", StrCat(s.max_clients() * s.synthetic_records), "--test-records",
           StrCat(s.synthetic_test_records), "--alpha", "1000", "--seed", StrCat(s.model_seed)},
          data / "make-data.log"));
    ASSIGN_OR_RETURN(auto records, ReadRecords(pool / "client-1.jsonl", s.label_field, 0));
    prepared.train.push_back(std::move(records));
    ASSIGN_OR_RETURN(test, ReadRecords(pool / "test.jsonl", s.label_field, 0));
  } else {
    for (const std::string& f : s.train_files) {
      ASSIGN_OR_RETURN(auto records,
                       ReadRecords(s.data_dir / f, s.label_field, s.max_train_records));
      prepared.train.push_back(std::move(records));
    }
    for (const std::string& f : s.test_files) {
      ASSIGN_OR_RETURN(auto records,
                       ReadRecords(s.data_dir / f, s.label_field, s.max_test_records, true));
      test.insert(test.end(), records.begin(), records.end());
    }
  }
  prepared.test = data / "test.jsonl";
  RETURN_IF_ERROR(common::WriteFileAtomically(prepared.test, Lines(test)));
  return prepared;
}

absl::StatusOr<Split> SplitFor(const ExperimentSpec& s, const ExperimentData& data, uint64_t seed,
                               int clients, double alpha) {
  const fs::path dir = s.out / "data" /
                       (s.partition == "per-file" ? StrCat("per-file")
                                                  : StrCat("s", seed, "_k", clients, "_a", alpha));
  Split split;
  for (int k = 1; k <= clients; ++k) split.clients.push_back(dir / StrCat("client-", k, ".jsonl"));
  split.pooled = dir / "pooled.jsonl";
  if (fs::exists(split.pooled)) return split;
  std::vector<std::vector<Record>> parts;
  if (s.partition == "per-file") {
    parts = data.train;
  } else {
    std::vector<Record> pool;
    for (const auto& file : data.train) pool.insert(pool.end(), file.begin(), file.end());
    if (s.synthetic)
      pool.resize(std::min(pool.size(), static_cast<size_t>(clients) * s.synthetic_records));
    ASSIGN_OR_RETURN(parts, SplitPool(pool, clients, alpha, static_cast<size_t>(s.batch), seed));
  }
  fs::create_directories(dir);
  std::vector<Record> pooled;
  for (int k = 0; k < clients; ++k) {
    RETURN_IF_ERROR(common::WriteFileAtomically(split.clients[k], Lines(parts[k])));
    pooled.insert(pooled.end(), parts[k].begin(), parts[k].end());
  }
  RETURN_IF_ERROR(common::WriteFileAtomically(split.pooled, Lines(pooled)));  // last: the marker
  return split;
}

}  // namespace fedlora::tool
