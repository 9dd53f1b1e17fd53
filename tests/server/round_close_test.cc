// A round's close (server/round/close.h): the record it commits, computed here from the uploads
// by hand — who arrived, who was dropped, declined or rejected (with the outliers the accumulator
// left out), weights' shares and weighted losses, bytes — and that a failed write leaves the
// ledger as it was, so the close can run again and commit once.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/base/strings.h"
#include "common/tensor/blob.h"
#include "server/round/close.h"
#include "tests/scratch_dir.h"
#include "tests/test_env.h"

namespace fedlora::server {
namespace {

using ::testing::ElementsAre;

class NoSource final : public UpdateSource {
 public:
  absl::StatusOr<common::Adapter> Update(const AcceptedUpdate&, common::Adapter) const override {
    return absl::UnimplementedError("not read");
  }
  absl::StatusOr<std::vector<common::MatrixD>> Products(const AcceptedUpdate&) const override {
    return absl::UnimplementedError("not read");
  }
};

// Aggregates into a fixed adapter, leaving `outlier` out.
class Fixed final : public Accumulator {
 public:
  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource&) override {
    ++calls;
    RoundOutput out;
    out.adapter = *common::Adapter::Create({{"m.q_proj", 2, 4, 3, 1.0, false}});
    out.adapter.values()[0] = 1.5f;
    for (const AcceptedUpdate& u : updates)
      if (u.client != "e") out.aggregated.push_back(u.client);
    out.norm_outliers["e"] = 77;
    return out;
  }
  int calls = 0;
};

TEST(RoundCloseTest, CommitsTheRecordOfWhoArrivedAndWhatMovedOnce) {
  fedlora::testing::ScratchDir dir;
  fedlora::testing::TestEnv env;
  auto opened = StateStore::Open(dir.path(), &env);
  ASSERT_TRUE(opened.ok());
  StateStore store = *std::move(opened);
  Ledger ledger;
  ledger.run_id = "fedit-1";
  ledger.base_model_sha256 = std::string(64, 'a');
  ledger.modules = {{"m.q_proj", 4, 3}};
  ledger.versions.push_back({0, {*store.PutBlob("v0", BlobKind::kAdapter, 0)}, {}, {}});
  ASSERT_TRUE(store.SaveLedger(ledger).ok());
  // Accepted: a (10 examples, loss 4 → 2), b (30, 8 → 4), e (an outlier); c dropped, d declined.
  Uploads uploads(&store);
  for (const auto& [id, weight, before, after] :
       std::vector<std::tuple<std::string, int64_t, double, double>>{
           {"a", 10, 4, 2}, {"b", 30, 8, 4}, {"e", 5, 1, 1}}) {
    const std::string bytes = id + " update";
    v1::UploadRequest r;
    r.set_round(1);
    r.set_sha256(common::Sha256Hex(bytes));
    r.set_total_size(static_cast<int64_t>(bytes.size()));
    r.set_data(bytes);
    bool complete = false;
    ASSERT_TRUE(uploads.Receive(1, id, r, &complete).ok());
    ASSERT_TRUE(complete);
    v1::TrainMetrics m;
    m.set_loss_before(before);
    m.set_loss_after(after);
    ASSERT_TRUE(uploads.Accept(1, id, weight, 0, m).ok());
  }
  RoundFacts facts{1, {}, {{"z", 0}}};
  facts.who.cohort = {"a", "b", "c", "d", "e"};
  facts.who.declined = {{"d", "busy"}};
  facts.who.rejected = {{"x", 2}};
  facts.who.bytes_down = {{"a", 1}, {"b", 2}, {"c", 3}, {"d", 4}, {"e", 5}};
  Fixed acc;
  NoSource source;

  env.FailPath("ledger.json");  // the commit fails, after the version's blob was written
  EXPECT_FALSE(CloseRound(facts, acc, source, uploads, store).ok());
  env.Heal();
  EXPECT_EQ(store.ledger().latest(), 0);
  EXPECT_EQ(common::ReadFileToString(dir.path() / "ledger.json")->find("\"version\": 1"),
            std::string::npos);

  auto record = CloseRound(facts, acc, source, uploads, store);  // the retry
  ASSERT_TRUE(record.ok()) << record.status();
  EXPECT_EQ(acc.calls, 2);
  EXPECT_EQ(store.ledger().latest(), 1);
  EXPECT_EQ(*store.ledger().at(1).record, *record);
  EXPECT_THAT(record->who.arrived, ElementsAre("a", "b"));
  EXPECT_THAT(record->dropped, ElementsAre("c"));
  EXPECT_EQ(record->who.rejected, (common::PerClient{{"e", 1}, {"x", 2}}));
  EXPECT_EQ(record->norm_outliers.at("e"), 77);
  EXPECT_EQ(record->weight_share.at("a"), 0.25);
  EXPECT_EQ(record->weight_share.at("b"), 0.75);
  EXPECT_EQ(record->mean_loss_before, (10 * 4 + 30 * 8) / 40.0);
  EXPECT_EQ(record->mean_train_loss, (10 * 2 + 30 * 4) / 40.0);
  EXPECT_EQ(record->who.bytes_up.at("b"), 8);
  EXPECT_EQ(record->who.bytes_down.at("c"), 3);
  EXPECT_EQ(record->examples.at("a"), 10);
  EXPECT_EQ(record->updates.at("b"), common::Sha256Hex("b update"));
  EXPECT_EQ(record->late.at("z"), 0);
  // The version's blob is the accumulator's adapter.
  const std::string blob = *store.ReadWholeBlob(record->global_blob);
  EXPECT_EQ(common::DecodeAdapter(blob, "v1")->values()[0], 1.5f);
}

}  // namespace
}  // namespace fedlora::server
