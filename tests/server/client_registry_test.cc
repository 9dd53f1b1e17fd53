// Admission and the registry (server/client_registry.h): each reason a join is refused, with what
// was expected and what came, and the registry's view of who takes part and who is silent.
#include "server/client_registry.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace fedlora::server {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

const std::string kSha(64, 'a');

v1::JoinRequest Request() {
  v1::JoinRequest r;
  r.set_base_model_sha256(kSha);
  r.set_num_examples(10);
  r.set_max_rank(8);
  v1::ModuleSpec* m = r.add_modules();
  m->set_name("model.layers.0.self_attn.q_proj");
  m->set_in_features(16);
  m->set_out_features(8);
  return r;
}

TEST(CheckAdmissionTest, RefusesEachWrongJoinSayingWhatWasExpected) {
  const std::vector<ModuleSpec> run = {{"model.layers.0.self_attn.q_proj", 16, 8}};
  EXPECT_TRUE(CheckAdmission(Request(), kSha, 4, run, 100).ok());
  EXPECT_TRUE(CheckAdmission(Request(), "", 4, {}, 100).ok());  // the run does not exist yet
  struct Case {
    std::function<void(v1::JoinRequest&)> change;
    std::vector<ModuleSpec> run;
    absl::StatusCode code;
    std::string says;
  };
  const std::vector<ModuleSpec> other = {{"model.layers.0.self_attn.v_proj", 16, 8}};
  for (const Case& c : std::vector<Case>{
           {[](auto& r) { r.set_base_model_sha256("abc"); }, run,
            absl::StatusCode::kInvalidArgument, "is not a sha256"},
           {[](auto& r) { r.set_num_examples(0); }, run, absl::StatusCode::kInvalidArgument,
            "num_examples is 0; it must be positive"},
           {[](auto& r) { r.set_num_examples(101); }, run, absl::StatusCode::kInvalidArgument,
            "admits at most 100 per client"},
           {[](auto& r) { r.set_base_model_sha256(std::string(64, 'b')); }, run,
            absl::StatusCode::kFailedPrecondition, "hint: wrong base model?"},
           {[](auto& r) { r.set_max_rank(2); }, run, absl::StatusCode::kFailedPrecondition,
            "the run trains rank 4 but your max_rank is 2"},
           {[](auto& r) { r.mutable_modules(0)->set_name("q\xff"); },
            {},
            absl::StatusCode::kInvalidArgument,
            "a module name of 2 bytes is not UTF-8"},
           {[](auto& r) { r.mutable_modules(0)->set_in_features(0); },
            {},
            absl::StatusCode::kInvalidArgument,
            "dimensions must be in [1, "},
           {[](auto&) {}, other, absl::StatusCode::kFailedPrecondition,
            "your model lacks module model.layers.0.self_attn.v_proj (8x16)"},
       }) {
    v1::JoinRequest r = Request();
    c.change(r);
    const absl::Status st = CheckAdmission(r, kSha, 4, c.run, 100);
    EXPECT_EQ(st.code(), c.code) << c.says << ": " << st;
    EXPECT_THAT(st.message(), HasSubstr(c.says));
  }
}

TEST(ClientRegistryTest, KnowsWhoTakesPartAndWhoIsSilent) {
  using namespace std::chrono_literals;
  const auto t0 = std::chrono::steady_clock::time_point() + 1h;
  ClientRegistry r;
  EXPECT_TRUE(r.Join("b", 10, t0));
  EXPECT_TRUE(r.Join("a", 20, t0));
  EXPECT_FALSE(r.Join("a", 25, t0 + 1s));  // a re-join
  EXPECT_EQ(r.Find("a")->num_examples, 25);
  EXPECT_THAT(r.TakingPart(), ElementsAre("a", "b"));
  r.Find("b")->left = "budget spent";
  EXPECT_THAT(r.TakingPart(), ElementsAre("a"));
  EXPECT_FALSE(r.Join("b", 10, t0));  // joining again takes part again
  EXPECT_THAT(r.TakingPart(), ElementsAre("a", "b"));
  r.Touch("a", t0 + 30s);
  r.Touch("nobody", t0 + 30s);  // ignored
  EXPECT_FALSE(r.Silent("a", t0 + 60s, 40s));
  EXPECT_TRUE(r.Silent("b", t0 + 60s, 40s));
  EXPECT_TRUE(r.Silent("nobody", t0, 40s));
  r.Find("a")->bytes_down_this_round = 5;
  r.NewRound();
  EXPECT_EQ(r.Find("a")->bytes_down_this_round, 0);
  EXPECT_EQ(r.size(), 2u);
}

}  // namespace
}  // namespace fedlora::server
