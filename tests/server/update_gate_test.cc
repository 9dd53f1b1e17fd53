// The update gate (server/intake/update_gate.h), one check at a time: every refusal Admit makes at
// a chunk, with the reason a client acts on, and every finding Check makes of a complete upload in
// the store — each against an update built here by hand to break exactly that rule.
#include "server/intake/update_gate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "common/base/strings.h"
#include "common/tensor/blob.h"
#include "server/errors.h"
#include "server/intake/uploads.h"
#include "tests/scratch_dir.h"
#include "tests/test_env.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using ::testing::HasSubstr;
using v1::ErrorDetail;

constexpr int kRank = 2;
constexpr double kAlpha = 8;  // the task's scaling is 4
const std::vector<common::ModuleShape> kShapes = {{"m.q_proj", kRank, 6, 5, 1.0, false}};

class UpdateGateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    options_.method = common::Method::kFedIt;
    options_.rank = kRank;
    options_.lora_alpha = kAlpha;
    options_.max_update_bytes = 1 << 20;
    auto store = StateStore::Open(dir_.path(), &env_);
    ASSERT_TRUE(store.ok()) << store.status();
    store_ = std::make_unique<StateStore>(*std::move(store));
  }
  // A view of round 3 (from version 2) with cohort a, b open.
  RoundView Open() const { return {true, false, false, 3, -1, 2, &cohort_}; }
  v1::UploadRequest Request(int64_t round = 3, int64_t version = 2) const {
    v1::UploadRequest r;
    r.set_round(round);
    r.set_state_version(version);
    r.set_total_size(100);
    r.set_sha256(std::string(64, 'a'));
    return r;
  }
  Verdict Admit(const RoundView& view, const v1::UploadRequest& r, bool accepted = false) const {
    return UpdateGate::Admit(view, {"a", kRank, 10, accepted}, r, options_.max_update_bytes);
  }
  Adapter Update(double scaling = kAlpha / kRank) const {
    Adapter a = *Adapter::Create({{"m.q_proj", kRank, 6, 5, scaling, false}});
    for (size_t i = 0; i < a.values().size(); ++i) a.values()[i] = 0.01f * static_cast<float>(i);
    return a;
  }
  // `bytes` as client a's complete upload for round 3, checked; the request says `sha256`
  // (default: the bytes' own) and claims `examples`.
  Verdict Check(const std::string& bytes, CheckedUpdate* out, int64_t examples = 10,
                std::string sha256 = "", double cap = std::numeric_limits<double>::infinity()) {
    const std::string part = PartName(3, "a");
    EXPECT_TRUE(store_->StartPart(part).ok());
    EXPECT_TRUE(store_->WritePart(part, 0, bytes).ok());
    v1::UploadRequest r = Request();
    r.set_sha256(sha256.empty() ? common::Sha256Hex(bytes) : sha256);
    r.set_total_size(static_cast<int64_t>(bytes.size()));
    r.set_num_examples(examples);
    UpdateGate gate(&options_, store_.get(), kShapes, std::make_shared<Adapter>(), std::nullopt,
                    cap);
    return gate.Check({"a", kRank, 10, false}, r, part, out);
  }

  fedlora::testing::ScratchDir dir_;
  fedlora::testing::TestEnv env_;
  ServerOptions options_;
  std::unique_ptr<StateStore> store_;
  const std::vector<std::string> cohort_ = {"a", "b"};
};

TEST_F(UpdateGateTest, AdmitRefusesEachWrongChunkWithItsReason) {
  EXPECT_TRUE(Admit(Open(), Request()).ok());
  struct Case {
    RoundView view;
    v1::UploadRequest request;
    ErrorDetail::Reason reason;
    std::string says;
  };
  RoundView closing = Open();
  closing.closing = true;
  RoundView none = Open();
  none.open = false;
  RoundView done = none;
  done.done = true;
  RoundView init = Open();
  init.round = 0;
  init.init_step = 1;
  init.version = -1;
  v1::UploadRequest zero = Request(), huge = Request(), bad_sha = Request(), step0 = Request(0, -1),
                    step2 = Request(0, -1);
  zero.set_total_size(0);
  huge.set_total_size((1 << 20) + 1);
  bad_sha.set_sha256(std::string(64, 'A'));
  step0.set_sketch_step(0);
  step2.set_sketch_step(2);
  for (const Case& c : std::vector<Case>{
           {Open(), Request(2), ErrorDetail::LATE, "round 2 closed before this update arrived"},
           {closing, Request(), ErrorDetail::LATE, "round 3 closed before this update arrived"},
           {done, Request(), ErrorDetail::LATE, "(late)"},
           {none, Request(4), ErrorDetail::STALE_TASK, "no round is open"},
           {Open(), Request(4), ErrorDetail::STALE_TASK, "upload for round 4 but round 3 is open"},
           {Open(), Request(3, 1), ErrorDetail::STALE_TASK, "trained from version 1"},
           {init, step0, ErrorDetail::LATE, "round 0 closed"},
           {init, step2, ErrorDetail::STALE_TASK, "answer to initialisation step 3 but step 2"},
           {Open(), zero, ErrorDetail::REJECTED, "an update has at least one byte"},
           {Open(), huge, ErrorDetail::REJECTED, "exceeds the limit of 1048576 bytes"},
           {Open(), bad_sha, ErrorDetail::REJECTED, "is not 64 lower-case hex digits"},
       }) {
    const Verdict v = Admit(c.view, c.request);
    EXPECT_EQ(v.reason, c.reason) << c.says;
    EXPECT_THAT(v.status.message(), HasSubstr(c.says));
    EXPECT_EQ(server::DetailOf(v.ToStatus())->reason(), c.reason) << c.says;
  }
  // Not in the cohort; and a retry of an accepted update while the commit is retried is let
  // through (to be answered as accepted).
  const Verdict stranger = UpdateGate::Admit(Open(), {"z", kRank, 10, false}, Request(), 1 << 20);
  EXPECT_EQ(stranger.reason, ErrorDetail::STALE_TASK);
  EXPECT_THAT(stranger.status.message(), HasSubstr("z is not in round 3's cohort"));
  EXPECT_TRUE(Admit(closing, Request(), /*accepted=*/true).ok());
}

// Admit's limit is what the task's update can be, not --max-update-bytes (1 GiB by default): a
// member cannot make the coordinator spool, map and hash a gigabyte for a 100-byte update. Every
// honest update — at the run's rank, at a client's own rank, Fed-SB's R, a step's products —
// fits under it, with a header's worth of room and no more.
TEST_F(UpdateGateTest, AnUploadIsBoundedByTheSizeOfTheTasksUpdate) {
  options_.max_update_bytes = int64_t{1} << 30;
  const std::string name = "model.layers.0.self_attn.q_proj";
  const std::vector<common::ModuleShape> shapes = {{name, kRank, 600, 500, 1.0, false}};
  const auto encoded = [&](int rank, bool has_r, common::AdapterParts parts) {
    Adapter a = *Adapter::Create({{name, rank, 600, 500, kAlpha / rank, has_r}});
    return static_cast<int64_t>(common::EncodeAdapter(a, parts).size());
  };
  const UpdateGate gate(&options_, store_.get(), shapes, std::make_shared<Adapter>(), std::nullopt,
                        1e9);
  const int64_t data = 4 * kRank * (600 + 500);
  EXPECT_GE(gate.MaxBytes(0), encoded(kRank, false, common::AdapterParts::kAll));
  EXPECT_LT(gate.MaxBytes(0), data + 8192);  // the header's room: kilobytes, not a gigabyte
  EXPECT_GE(gate.MaxBytes(8), encoded(8, false, common::AdapterParts::kAll));
  EXPECT_LT(gate.MaxBytes(8), 4 * 8 * (600 + 500) + 8192);

  options_.method = common::Method::kFedSb;
  const UpdateGate fed_sb(&options_, store_.get(), shapes, std::make_shared<Adapter>(),
                          std::nullopt, 1e9);
  EXPECT_GE(fed_sb.MaxBytes(0), encoded(kRank, true, common::AdapterParts::kROnly));
  EXPECT_LT(fed_sb.MaxBytes(0), 4 * kRank * kRank + 8192);
  const UpdateGate step(&options_, store_.get(), {}, std::make_shared<Adapter>(),
                        std::vector<common::MatrixShape>{{name, 500, 24}}, 1e9);
  const int64_t answer =
      static_cast<int64_t>(common::EncodeMatrices({{name, common::MatrixD::Ones(500, 24)}}).size());
  EXPECT_GE(step.MaxBytes(0), answer);
  EXPECT_LT(step.MaxBytes(0), 4 * 500 * 24 + 8192);

  // 224 modules (448 tensors) with long names and small shapes: the header is most of the file.
  options_.method = common::Method::kFedIt;
  std::vector<common::ModuleShape> many;
  for (int layer = 0; layer < 32; ++layer) {
    for (const char* m :
         {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}) {
      many.push_back(
          {common::StrCat("model.language_model.decoder.layers.", layer, ".self_attention.", m), 1,
           3, 2, kAlpha, false});
    }
  }
  const UpdateGate wide(&options_, store_.get(), many, std::make_shared<Adapter>(), std::nullopt,
                        1e9);
  Adapter a = *Adapter::Create(many);
  const int64_t bytes = static_cast<int64_t>(common::EncodeAdapter(a).size());
  EXPECT_GE(wide.MaxBytes(1), bytes);
  EXPECT_LT(wide.MaxBytes(1) - bytes, 448 * 256);  // under 256 bytes of room per tensor

  // Admit refuses a byte more, at the first chunk; --max-update-bytes still caps it.
  v1::UploadRequest r = Request();
  r.set_total_size(gate.MaxBytes(0) + 1);
  const Verdict v = UpdateGate::Admit(Open(), {"a", kRank, 10, false}, r, gate.MaxBytes(0));
  EXPECT_EQ(v.reason, ErrorDetail::REJECTED);
  EXPECT_TRUE(absl::IsResourceExhausted(v.status)) << v.status;
  options_.max_update_bytes = 1000;
  EXPECT_EQ(gate.MaxBytes(0), 1000);
}

TEST_F(UpdateGateTest, CheckTakesAGoodUpdateAtItsClaimWithinTheCap) {
  CheckedUpdate checked;
  const std::string bytes = common::EncodeAdapter(Update());
  ASSERT_TRUE(Check(bytes, &checked, 7).ok());
  EXPECT_EQ(checked.weight, 7);
  ASSERT_TRUE(Check(bytes, &checked, 0).ok());  // no claim: the examples it joined with
  EXPECT_EQ(checked.weight, 10);
  ASSERT_TRUE(Check(bytes, &checked, 9, "", /*cap=*/6.7).ok());  // floored cap
  EXPECT_EQ(checked.weight, 6);
}

TEST_F(UpdateGateTest, CheckRejectsEachBrokenUpdateSayingWhy) {
  CheckedUpdate checked;
  const std::string good = common::EncodeAdapter(Update());
  Adapter nan = Update();
  nan.A(0)(1, 2) = std::numeric_limits<float>::quiet_NaN();
  Adapter wide = *Adapter::Create({{"m.q_proj", kRank + 1, 6, 5, kAlpha / kRank, false}});
  Adapter other = *Adapter::Create({{"m.v_proj", kRank, 6, 5, kAlpha / kRank, false}});
  struct Case {
    std::string bytes;
    int64_t examples;
    std::string sha256;
    std::string says;
  };
  for (const Case& c : std::vector<Case>{
           {good, 10, std::string(64, 'b'), "checksum mismatch: the update's sha256 is"},
           {"not safetensors", 10, "", "update of a for round 3"},
           {common::EncodeAdapter(nan), 10, "", "holds a non-finite value"},
           {common::EncodeAdapter(wide), 10, "", "module m.q_proj: lora_A has shape [3,6]"},
           {common::EncodeAdapter(other), 10, "", "module m.q_proj is missing"},
           {common::EncodeAdapter(Update(/*scaling=*/40)), 10, "", "scaling 40, the task's is 4"},
           {good, 11, "", "the update claims 11 examples, more than the 10 a joined with"},
       }) {
    const Verdict v = Check(c.bytes, &checked, c.examples, c.sha256);
    EXPECT_EQ(v.reason, ErrorDetail::REJECTED) << c.says;
    EXPECT_THAT(v.status.message(), HasSubstr(c.says));
  }
  // The absolute norm bound: ‖s·B·A‖_F of this update, computed here, is the line.
  const Adapter u = Update();
  const double norm = (4.0 * u.B(0).cast<double>() * u.A(0).cast<double>()).norm();
  options_.max_update_norm = norm * 0.99;
  Verdict v = Check(good, &checked);
  EXPECT_THAT(v.status.message(), HasSubstr("exceeds the run's bound of"));
  options_.max_update_norm = norm * 1.01;
  v = Check(good, &checked);
  ASSERT_TRUE(v.ok()) << v.status;
  EXPECT_NEAR(checked.norm, norm, 1e-6 * norm);
}

TEST_F(UpdateGateTest, AFedSbUpdateIsAnROnTheFrozenFactorsAndAnAnswerItsProducts) {
  options_.method = common::Method::kFedSb;
  auto frozen = std::make_shared<Adapter>(*Adapter::Create({{"m.q_proj", kRank, 6, 5, 1.0, true}}));
  for (float& x : frozen->values()) x = 0.5f;
  Adapter update = *frozen;
  update.R(0)(0, 1) = 3;
  update.set_scaling(0, kAlpha / kRank);  // the task's, as the client trained it
  UpdateGate gate(&options_, store_.get(), {{"m.q_proj", kRank, 6, 5, 1.0, true}}, frozen,
                  std::nullopt, 1e9);
  auto decoded = gate.Decode(common::EncodeAdapter(update, common::AdapterParts::kROnly), "u");
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->R(0)(0, 1), 3);
  EXPECT_EQ(decoded->B(0)(4, 1), 0.5f);  // the frozen B, not the client's
  EXPECT_EQ(decoded->module(0).scaling, 4.0);
  // R's scaling is the client's own: any other than the task's would scale its weight in ΣR.
  update.set_scaling(0, 1e30);
  EXPECT_THAT(gate.Decode(common::EncodeAdapter(update, common::AdapterParts::kROnly), "u")
                  .status()
                  .message(),
              HasSubstr("u: module m.q_proj: scaling 1e+30, the task's is 4"));

  UpdateGate sketch(&options_, store_.get(), {}, frozen,
                    std::vector<common::MatrixShape>{{"m.q_proj", 5, 3}}, 1e9);
  const std::string part = PartName(0, "a");
  const std::string bytes = common::EncodeMatrices({{"m.q_proj", common::MatrixD::Ones(5, 4)}});
  ASSERT_TRUE(store_->StartPart(part).ok());
  ASSERT_TRUE(store_->WritePart(part, 0, bytes).ok());
  v1::UploadRequest r = Request(0, -1);
  r.set_sha256(common::Sha256Hex(bytes));
  r.set_total_size(static_cast<int64_t>(bytes.size()));
  CheckedUpdate checked;
  const Verdict v = sketch.Check({"a", kRank, 10, false}, r, part, &checked);
  EXPECT_EQ(v.reason, ErrorDetail::REJECTED);
  EXPECT_THAT(v.status.message(), HasSubstr("a's answer to initialisation step 1"));
}

}  // namespace
}  // namespace fedlora::server
