// The run's typed records (common/run): every field survives JSON and back, the keys are the ones
// metrics.jsonl documents (checked against a line written by hand), and a malformed file is an
// error that names the file, the line and the field — never an exception.
#include "common/run/records.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <fstream>

#include "common/base/file_util.h"
#include "common/run/ledger.h"
#include "tests/scratch_dir.h"

namespace fedlora::common {
namespace {

using fedlora::testing::ScratchDir;
using ::testing::HasSubstr;

RoundRecord SampleRound() {
  RoundRecord r;
  r.round = 3;
  r.method = Method::kLoraFair;
  r.who.attempt = 2;
  r.who.cohort = {"a", "b", "c"};
  r.who.arrived = {"a", "b"};
  r.who.rejected = {{"c", 3}};
  r.who.declined = {{"d", "budget spent"}};
  r.who.bytes_up = {{"a", 100}, {"b", 200}};
  r.who.bytes_down = {{"a", 7}, {"b", 8}, {"c", 9}};
  r.who.elapsed_seconds = 12.5;
  r.dropped = {"e"};
  r.late = {{"f", 2}};
  r.mean_loss_before = 2.25;
  r.mean_train_loss = 1.125;
  r.aggregation_seconds = 0.5;
  r.updates = {{"a", std::string(64, '1')}, {"b", std::string(64, '2')}};
  r.examples = {{"a", 10}, {"b", 30}};
  r.weight_share = {{"a", 0.25}, {"b", 0.75}};
  r.global_blob = std::string(64, 'f');
  r.blob_bytes = 4096;
  r.client_dp = ClientDpSpend{std::nullopt, 1e-5, 3.5, 0.5, 4, 1.1, 0.9, 1.2, 0.8};
  r.norm_outliers = {{"c", 99.5}};
  r.dp_epsilon = {{"a", 3.25}};
  r.lora_fair_objective = 0.125;
  r.fedit_objective = 0.25;
  return r;
}

TEST(RecordsTest, ARoundRecordRoundTripsWithTheDocumentedKeys) {
  MetricsLine line{SampleRound(), 1.5, 0.75, {{"boolq", 0.5}}};
  const nlohmann::json j = line.ToJson();
  // The keys users' tools read (README: metrics.jsonl), by hand.
  for (const char* key : {"round",
                          "version",
                          "method",
                          "attempt",
                          "cohort",
                          "arrived",
                          "dropped",
                          "rejected",
                          "declined",
                          "late",
                          "bytes_up",
                          "bytes_down",
                          "mean_loss_before",
                          "mean_train_loss",
                          "aggregation_seconds",
                          "elapsed_seconds",
                          "updates",
                          "examples",
                          "weight_share",
                          "global_blob",
                          "blob_bytes",
                          "client_dp",
                          "norm_outliers",
                          "dp_epsilon",
                          "lora_fair_objective",
                          "fedit_objective",
                          "eval_loss",
                          "eval_accuracy",
                          "eval_accuracy_by_task"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["method"], "lora-fair");
  EXPECT_EQ(j["version"], 3);
  EXPECT_TRUE(j["client_dp"]["epsilon"].is_null());  // infinite: no noise
  auto back = JsonReader::Parse<MetricsLine>(j, "line");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), j);
  EXPECT_EQ(back->record.who.declined.at("d"), "budget spent");
  EXPECT_FALSE(back->record.client_dp->epsilon.has_value());
  EXPECT_EQ(back->record.client_dp->next_clip, 0.8);
  // Each rejected client once, with its count; files written before the counts listed a client
  // once per refused update, and read as the same counts.
  EXPECT_EQ(j["rejected"], nlohmann::json({{"c", 3}}));
  nlohmann::json old = j;
  old["rejected"] = {"c", "x", "c"};
  back = JsonReader::Parse<MetricsLine>(old, "line");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->record.who.rejected, (PerClient{{"c", 2}, {"x", 1}}));
  old["rejected"] = {"c", 7};
  EXPECT_THAT(JsonReader::Parse<MetricsLine>(old, "line").status().message(),
              HasSubstr("line: /rejected/1: expected a string, found 7"));
}

TEST(RecordsTest, MetricsLinesNameTheFileLineAndFieldOfWhatIsWrong) {
  ScratchDir dir;
  const auto file = dir.path() / "metrics.jsonl";
  const std::string good = MetricsLine{SampleRound(), 1.5, {}, {}}.ToJson().dump();
  nlohmann::json bad = nlohmann::json::parse(good);
  bad["client_dp"]["delta"] = "small";
  ASSERT_TRUE(WriteFileAtomically(file, good + "\n" + bad.dump() + "\n").ok());
  auto read = ReadMetrics(file);
  ASSERT_FALSE(read.ok());
  EXPECT_TRUE(absl::IsDataLoss(read.status()));
  EXPECT_THAT(read.status().message(),
              HasSubstr(file.string() + " line 2: /client_dp/delta: expected a number, found "
                                        "\"small\""));
  for (const auto& [mutate, want] :
       std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>>{
           {[](nlohmann::json& j) { j.erase("mean_train_loss"); }, "/mean_train_loss: missing"},
           {[](nlohmann::json& j) { j["bytes_up"]["a"] = 1.5; },
            "/bytes_up/a: expected an integer"},
           {[](nlohmann::json& j) { j["bytes_up"]["a"] = 18446744073709551615ull; },
            "/bytes_up/a: expected an integer of at most 2^63 - 1"},
           {[](nlohmann::json& j) { j["cohort"] = "a,b"; }, "/cohort: expected an array"},
           {[](nlohmann::json& j) { j["cohort"][1] = 7; }, "/cohort/1: expected a string"},
           {[](nlohmann::json& j) { j["method"] = "fedavg"; }, "/method: unknown method"},
           {[](nlohmann::json& j) { j["attempt"] = 1e12; }, "/attempt: expected an integer"},
           {[](nlohmann::json& j) { j["version"] = 4; }, "/version: version 4 of round 3"},
           {[](nlohmann::json& j) { j = nlohmann::json::array(); }, "/: expected an object"},
       }) {
    nlohmann::json j = nlohmann::json::parse(good);
    mutate(j);
    ASSERT_TRUE(WriteFileAtomically(file, j.dump() + "\n").ok());
    read = ReadMetrics(file);
    ASSERT_FALSE(read.ok()) << want;
    EXPECT_THAT(read.status().message(), HasSubstr(file.string() + " line 1: " + want));
  }
  ASSERT_TRUE(WriteFileAtomically(file, good + "\n{\"round\": \n").ok());
  EXPECT_THAT(ReadMetrics(file).status().message(), HasSubstr("line 2: not a JSON object"));
}

Ledger SampleLedger() {
  Ledger l;
  l.run_id = "fed-sb-0123";
  l.method = Method::kFedSb;
  l.base_model_sha256 = std::string(64, 'a');
  l.modules = {{"model.layers.0.self_attn.q_proj", 64, 32}};
  InitStepRecord init{2, 2, "project", {}, std::nullopt, {{"a", 10}}, {{"a", 20}}};
  init.who.cohort = {"a"};
  init.who.arrived = {"a"};
  l.versions.push_back({0, {{std::string(64, 'b'), 10, BlobKind::kFrozen, 0}}, std::nullopt, init});
  RoundRecord r = SampleRound();
  r.round = 1;
  r.method = Method::kFedSb;
  l.versions.push_back({1, {{std::string(64, 'c'), 11, BlobKind::kR, 1}}, r, std::nullopt});
  l.client_dp = ClientDpState{0.7, {{1, 0.5, 1.1, 1}}};
  return l;
}

TEST(LedgerTest, RoundTripsAndRefusesWhatIsNotALedger) {
  const Ledger l = SampleLedger();
  const nlohmann::json j = l.ToJson();
  auto back = JsonReader::Parse<Ledger>(j, "ledger.json");
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->ToJson(), j);
  EXPECT_EQ(back->versions[0].init_record->init_bytes_down.at("a"), 20);
  EXPECT_EQ(back->versions[1].record->method, Method::kFedSb);
  EXPECT_EQ(back->client_dp->rounds[0].sigma, 1.1);
  EXPECT_TRUE(back->HoldsBlob(std::string(64, 'c')));
  EXPECT_FALSE(back->HoldsBlob(std::string(64, 'd')));

  for (const auto& [mutate, want] :
       std::vector<std::pair<std::function<void(nlohmann::json&)>, std::string>>{
           {[](nlohmann::json& j) { j["format"] = "fedlora-ledger-0"; },
            "/format: expected \"fedlora-ledger-1\""},
           {[](nlohmann::json& j) { j["versions"].erase(0); },
            "/versions/0: version 1 stands at position 0"},
           {[](nlohmann::json& j) { j["versions"][1]["version"] = 2; },
            "/versions/1/record: the record of round 1 on version 2"},
           {[](nlohmann::json& j) { j["versions"][1]["blobs"][0]["kind"] = "weights"; },
            "/versions/1/blobs/0/kind: unknown blob kind 'weights'"},
           {[](nlohmann::json& j) { j["versions"][1]["blobs"][0]["sha256"] = "../../etc"; },
            "/versions/1/blobs/0/sha256: not 64 lower-case hex digits"},
           {[](nlohmann::json& j) { j["versions"][1]["record"]["round"] = 5; },
            "/versions/1/record/version: version 1 of round 5"},
           {[](nlohmann::json& j) { j["modules"][0]["in_features"] = -1; },
            "/modules/0/in_features: module"},
           {[](nlohmann::json& j) { j["client_dp"]["rounds"][0]["q"] = "x"; }, "/client_dp/rounds"},
           // What the coordinator would index without looking (found in review: .at(0) threw).
           {[](nlohmann::json& j) { j["versions"][1]["blobs"] = nlohmann::json::array(); },
            "/versions/1/blobs: 0 blobs; version 1 of a fed-sb run holds exactly one"},
           {[](nlohmann::json& j) { j["versions"][1]["blobs"][0]["kind"] = "delta"; },
            "/versions/1/blobs/0/kind: delta; version 1 of a fed-sb run holds a blob of kind r"},
           {[](nlohmann::json& j) { j["versions"][0]["blobs"][0]["kind"] = "adapter"; },
            "/versions/0/blobs/0/kind: adapter; version 0 of a fed-sb run holds a blob of kind "
            "frozen"},
           {[](nlohmann::json& j) { j["versions"] = nlohmann::json::array(); },
            "/versions: none; only a fed-sb run still in its initialisation"},
           {[](nlohmann::json& j) {
              j["method"] = "flora";
              j["versions"][0]["blobs"] = nlohmann::json::array();  // flora's version 0 has none
              j["versions"][1]["record"]["method"] = "flora";
            },
            "/versions/1/blobs/0/kind: r; version 1 of a flora run holds a blob of kind delta"},
       }) {
    nlohmann::json bad = j;
    mutate(bad);
    auto read = JsonReader::Parse<Ledger>(bad, "state/ledger.json");
    ASSERT_FALSE(read.ok()) << want;
    EXPECT_THAT(read.status().message(), HasSubstr("state/ledger.json: " + want));
  }
  // A file that is not JSON: the line where the parser stopped.
  ScratchDir dir;
  const auto file = dir.path() / "ledger.json";
  ASSERT_TRUE(
      WriteFileAtomically(file, "{\n  \"format\": \"fedlora-ledger-1\",\n  \"run_id\": ]\n}\n")
          .ok());
  const auto read = ReadLedger(file);
  EXPECT_TRUE(absl::IsDataLoss(read.status())) << read.status();
  EXPECT_THAT(read.status().message(), HasSubstr(file.string() + " line 3: not valid JSON"));
}

}  // namespace
}  // namespace fedlora::common
