#include "common/tensor/peft.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "common/base/file_util.h"
#include "tests/test_util.h"

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

void WriteText(const fs::path& path, const std::string& text) { std::ofstream(path) << text; }

// A PEFT directory written by hand: `config` verbatim, and the named tensors filled with 0.5.
void MakePeftDir(const fs::path& dir, const std::string& config,
                 const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors) {
  fs::create_directories(dir);
  if (!config.empty()) WriteText(dir / kAdapterConfigFile, config);
  std::vector<std::vector<float>> storage;
  std::vector<TensorToWrite> out;
  for (const auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    storage.emplace_back(static_cast<size_t>(n), 0.5f);
  }
  for (size_t i = 0; i < tensors.size(); ++i)
    out.push_back({tensors[i].first, tensors[i].second, storage[i]});
  ASSERT_TRUE(
      WriteSafetensors(dir / kAdapterWeightsFile, out, DType::kF32, {{"format", "pt"}}).ok());
}

const char* kQ = "base_model.model.model.layers.0.self_attn.q_proj";
const char* kV = "base_model.model.model.layers.0.self_attn.v_proj";

TEST(PeftTest, ScalingFollowsPeftRules) {
  EXPECT_DOUBLE_EQ(LoraScaling(32, 16, false), 2.0);
  EXPECT_DOUBLE_EQ(LoraScaling(32, 16, true), 8.0);  // alpha / sqrt(r)
}

TEST(PeftTest, ReadsRankAndAlphaPatternsAsPeftDoes) {
  testing::ScratchDir dir;
  // q_proj gets rank 8 from rank_pattern (scaling 32/8); v_proj keeps r = 16 and gets alpha 4
  // (scaling 4/16).
  MakePeftDir(dir.path(),
              R"({"peft_type":"LORA","r":16,"lora_alpha":32,"use_rslora":false,
                  "base_model_name_or_path":"HuggingFaceTB/SmolLM2-135M",
                  "rank_pattern":{"q_proj":8},"alpha_pattern":{"v_proj":4}})",
              {{std::string(kQ) + ".lora_A.weight", {8, 12}},
               {std::string(kQ) + ".lora_B.weight", {10, 8}},
               {std::string(kV) + ".lora_A.weight", {16, 12}},
               {std::string(kV) + ".lora_B.weight", {6, 16}}});
  auto a = ReadPeftAdapter(dir.path());
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_EQ(a->num_modules(), 2u);
  EXPECT_EQ(a->base_model, "HuggingFaceTB/SmolLM2-135M");
  const LoraModule& q = a->module(*a->FindModule("model.layers.0.self_attn.q_proj"));
  const LoraModule& v = a->module(*a->FindModule("model.layers.0.self_attn.v_proj"));
  EXPECT_EQ(q.rank, 8);
  EXPECT_EQ(q.in_features, 12);
  EXPECT_EQ(q.out_features, 10);
  EXPECT_DOUBLE_EQ(q.scaling, 4.0);
  EXPECT_EQ(v.rank, 16);
  EXPECT_EQ(v.out_features, 6);
  EXPECT_DOUBLE_EQ(v.scaling, 0.25);
  EXPECT_FLOAT_EQ(a->A(0)(3, 4), 0.5f);
}

TEST(PeftTest, ReadsRsLoraScaling) {
  testing::ScratchDir dir;
  MakePeftDir(
      dir.path(),
      R"({"peft_type":"LORA","r":4,"lora_alpha":6,"use_rslora":true,"target_modules":"q_proj"})",
      {{std::string(kQ) + ".lora_A.weight", {4, 3}}, {std::string(kQ) + ".lora_B.weight", {2, 4}}});
  auto a = ReadPeftAdapter(dir.path());
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_DOUBLE_EQ(a->module(0).scaling, 3.0);  // 6 / sqrt(4)
}

TEST(PeftTest, WriteThenReadKeepsEveryModuleValueAndScaling) {
  testing::ScratchDir dir;
  Adapter a = testing::RandomAdapter({{"model.layers.0.self_attn.q_proj", 8, 20, 24, 2.0},
                                      {"model.layers.0.self_attn.v_proj", 4, 20, 12, 0.75},
                                      {"model.layers.1.mlp.down_proj", 8, 30, 20, 2.0},
                                      {"model.layers.1.mlp.up_proj", 8, 20, 30, 2.0}},
                                     3);
  a.base_model = "my/base";
  ASSERT_TRUE(WritePeftAdapter(a, dir / "out").ok());
  auto b = ReadPeftAdapter(dir / "out");
  ASSERT_TRUE(b.ok()) << b.status();
  ASSERT_EQ(b->num_modules(), a.num_modules());
  EXPECT_EQ(b->base_model, "my/base");
  for (size_t i = 0; i < a.num_modules(); ++i) {
    EXPECT_EQ(b->module(i).name, a.module(i).name);  // file order is kept
    EXPECT_EQ(b->module(i).rank, a.module(i).rank);
    EXPECT_NEAR(b->module(i).scaling, a.module(i).scaling, 1e-15);
    EXPECT_EQ(b->A(i), a.A(i));
    EXPECT_EQ(b->B(i), a.B(i));
  }
  auto config = nlohmann::json::parse(*ReadFileToString(dir / "out" / kAdapterConfigFile));
  EXPECT_EQ(config["peft_type"], "LORA");
  EXPECT_EQ(config["r"], 8);
  EXPECT_EQ(config["target_modules"],
            (std::vector<std::string>{"down_proj", "q_proj", "up_proj", "v_proj"}));
  EXPECT_EQ(config["rank_pattern"].size(), 1u);  // v_proj has rank 4
  auto file = SafetensorsFile::Open(dir / "out" / kAdapterWeightsFile);
  EXPECT_EQ(file->view().metadata().at("format"), "pt");
  EXPECT_NE(file->view().Find("base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"),
            nullptr);
}

TEST(PeftTest, WritesAndReadsLoraR) {
  testing::ScratchDir dir;
  Adapter a = testing::RandomAdapter({{"model.layers.0.self_attn.q_proj", 4, 10, 6, 1.0, true}}, 5);
  ASSERT_TRUE(WritePeftAdapter(a, dir / "sb", {DType::kF32, false}).ok());
  auto b = ReadPeftAdapter(dir / "sb");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE(b->module(0).has_r);
  EXPECT_EQ(b->R(0), a.R(0));
  // Folding R into B keeps the effective delta.
  Adapter folded = b->FoldR();
  EXPECT_FALSE(folded.module(0).has_r);
  EXPECT_LT(testing::RelativeDiff(testing::DenseDelta(folded, 0), testing::DenseDelta(a, 0)), 1e-6);
}

TEST(PeftTest, ExistingOutputIsRefusedUnlessOverwriting) {
  testing::ScratchDir dir;
  Adapter a = testing::RandomAdapter({{"m.q_proj", 2, 4, 4}}, 1);
  Adapter b = testing::RandomAdapter({{"m.q_proj", 2, 4, 4}}, 2);
  ASSERT_TRUE(WritePeftAdapter(a, dir / "out").ok());
  absl::Status st = WritePeftAdapter(b, dir / "out");
  EXPECT_TRUE(absl::IsAlreadyExists(st)) << st;
  EXPECT_EQ(ReadPeftAdapter(dir / "out")->A(0), a.A(0));  // untouched
  ASSERT_TRUE(WritePeftAdapter(b, dir / "out", {DType::kF32, true}).ok());
  EXPECT_EQ(ReadPeftAdapter(dir / "out")->A(0), b.A(0));
  // Only the output directory is left: no temporaries.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir.path()), fs::directory_iterator()), 1);
}

struct BadDir {
  const char* what;
  std::string config;
  std::vector<std::pair<std::string, std::vector<int64_t>>> tensors;
  const char* message;
};

TEST(PeftTest, BadDirectoriesSayWhatIsWrong) {
  const std::string ok = R"({"peft_type":"LORA","r":4,"lora_alpha":8})";
  const std::string qa = std::string(kQ) + ".lora_A.weight",
                    qb = std::string(kQ) + ".lora_B.weight";
  const std::vector<BadDir> cases = {
      {"no config", "", {{qa, {4, 3}}, {qb, {2, 4}}}, "missing"},
      {"config not json", "{r:", {{qa, {4, 3}}, {qb, {2, 4}}}, "not valid JSON"},
      {"not lora",
       R"({"peft_type":"IA3","r":4,"lora_alpha":8})",
       {{qa, {4, 3}}, {qb, {2, 4}}},
       "LoRA adapters"},
      {"dora",
       R"({"peft_type":"LORA","r":4,"lora_alpha":8,"use_dora":true})",
       {{qa, {4, 3}}, {qb, {2, 4}}},
       "DoRA"},
      {"r not positive",
       R"({"peft_type":"LORA","r":0,"lora_alpha":8})",
       {{qa, {4, 3}}, {qb, {2, 4}}},
       "\"r\" must be an integer in [1, 65536], got 0"},
      // Regressions: 4294967304 was read as 8; lora_alpha 1e300 made the aggregate infinite.
      {"r past int",
       R"({"peft_type":"LORA","r":4294967304,"lora_alpha":8})",
       {{qa, {8, 3}}, {qb, {2, 8}}},
       "\"r\" must be an integer in [1, 65536], got 4294967304"},
      {"rank_pattern past int",
       R"({"peft_type":"LORA","r":4,"lora_alpha":8,"rank_pattern":{"q_proj":4294967300}})",
       {{qa, {4, 3}}, {qb, {2, 4}}},
       "rank_pattern[\"q_proj\"] must be an integer in [1, 65536], got 4294967300"},
      {"absurd alpha",
       R"({"peft_type":"LORA","r":4,"lora_alpha":1e300})",
       {{qa, {4, 3}}, {qb, {2, 4}}},
       "scaling 2.5e+299 is outside [-10000, 10000]"},
      {"config r differs",
       ok,
       {{qa, {8, 3}}, {qb, {2, 8}}},
       "rank 8 but adapter_config.json says r = 4"},
      {"rank of B differs", ok, {{qa, {4, 3}}, {qb, {2, 5}}}, "expected lora_B [m, 4]"},
      {"A without B", ok, {{qa, {4, 3}}}, "has lora_A but no lora_B"},
      {"3-D tensor", ok, {{qa, {4, 3, 1}}, {qb, {2, 4}}}, "2-D"},
      {"wrong R",
       ok,
       {{qa, {4, 3}}, {qb, {2, 4}}, {std::string(kQ) + ".lora_R.weight", {4, 3}}},
       "expected [4,4]"},
      {"foreign tensor",
       ok,
       {{qa, {4, 3}}, {qb, {2, 4}}, {"base_model.model.lm_head.weight", {2, 2}}},
       "unexpected tensor 'base_model.model.lm_head.weight'"},
  };
  for (const BadDir& c : cases) {
    testing::ScratchDir dir;
    MakePeftDir(dir.path(), c.config, c.tensors);
    auto a = ReadPeftAdapter(dir.path());
    ASSERT_FALSE(a.ok()) << c.what;
    EXPECT_THAT(a.status().message(), HasSubstr(c.message)) << c.what;
  }
}

// Regressions: a 60,000-character rank_pattern key crashed the reader (std::regex recursed off
// the stack), and "(a|aa)*c" against a 40-character module took 14 s (44: more than 30). The key
// is refused; "(a|aa)*c" now answers at once (PCRE2 sees that no 'c' is there), and a pattern
// that does backtrack without end, "(a|aa)*$" before the final "!", meets the match limit and is
// refused, saying why. A FIFO as the weights file hung the reader and is refused; a file that is
// not safetensors does not have its first bytes quoted back.
TEST(PeftTest, RegressionHostileConfigsAndFilesAreRefusedAtOnce) {
  const std::string module = std::string(44, 'a') + "!";
  const std::string a = "base_model.model." + module + ".lora_A.weight",
                    b = "base_model.model." + module + ".lora_B.weight";
  auto read = [&](const std::string& config) {
    testing::ScratchDir dir;
    MakePeftDir(dir.path(), config, {{a, {4, 3}}, {b, {2, 4}}});
    return ReadPeftAdapter(dir.path()).status();
  };
  const std::string long_key = std::string(60000, 'x');
  EXPECT_THAT(
      read(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"rank_pattern":{")" + long_key + R"(":2}})")
          .message(),
      HasSubstr("rank_pattern has a key of 60000 characters; at most 1024"));
  EXPECT_TRUE(
      read(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"alpha_pattern":{"(a|aa)*c":2}})").ok());
  EXPECT_THAT(
      read(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"alpha_pattern":{"(a|aa)*$":2}})").message(),
      HasSubstr("alpha_pattern key '(a|aa)*$' cannot be matched against module " + module +
                " within the matcher's limits"));
  // A pattern that matches as PEFT's re.match does: the end of the module path.
  EXPECT_TRUE(read(R"({"peft_type":"LORA","r":4,"lora_alpha":8,"alpha_pattern":{"a+!":2}})").ok());

  testing::ScratchDir dir;
  WriteText(dir / kAdapterConfigFile, R"({"peft_type":"LORA","r":4,"lora_alpha":8})");
  ASSERT_EQ(::mkfifo((dir / kAdapterWeightsFile).c_str(), 0600), 0);
  EXPECT_THAT(ReadPeftAdapter(dir.path()).status().message(),
              HasSubstr("is not a regular file (a FIFO)"));
  fs::remove(dir / kAdapterWeightsFile);
  WriteText(dir / kAdapterWeightsFile, "root:$6$secretsalt$hash:19000:0:99999:7:::\n");
  const std::string message(ReadPeftAdapter(dir.path()).status().message());
  EXPECT_THAT(message, HasSubstr("the header length field exceeds"));
  EXPECT_THAT(message, Not(HasSubstr("2609312867587944306")));  // "root:$6$" read as a length
}

TEST(PeftTest, MissingWeightsPointAtPickleFiles) {
  testing::ScratchDir dir;
  WriteText(dir / kAdapterConfigFile, R"({"peft_type":"LORA","r":4,"lora_alpha":8})");
  WriteText(dir / "adapter_model.bin", "pickle");
  auto a = ReadPeftAdapter(dir.path());
  EXPECT_THAT(a.status().message(), HasSubstr("adapter_model.bin (pickle) is not read"));
  EXPECT_THAT(ReadPeftAdapter(dir / "nope").status().message(), HasSubstr("is not a directory"));
}

}  // namespace
}  // namespace fedlora::common
