// End-to-end tests of the `fedlora` program: real processes, real files. The expected aggregates
// are recomputed here from the input directories with dense products.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "common/base/file_util.h"
#include "common/llm/llama_config.h"
#include "common/llm/trainer.h"
#include "common/tensor/peft.h"
#include "tests/process.h"
#include "tests/test_util.h"

namespace fedlora {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;
namespace fs = std::filesystem;

using Result = testing::CommandResult;
using testing::Args;
using testing::Argv;

Result Fedlora(const Args& args) {
  return testing::RunProgram(Argv(std::string(FEDLORA_BIN_DIR) + "/fedlora", args));
}

// `fedlora` in 2 GB of address space (`ulimit -v`): an allocation beyond that fails at once.
Result FedloraIn2Gb(const Args& args) {
  return testing::RunProgram(Argv("/bin/sh", "-c", "ulimit -v 2097152 && exec \"$0\" \"$@\"",
                                  std::string(FEDLORA_BIN_DIR) + "/fedlora", args));
}

class CliTest : public ::testing::Test {
 protected:
  std::string Dir(const std::string& name) const { return (scratch_ / name).string(); }
  void RandomAdapter(const std::string& name, const Args& args) {
    Result r = Fedlora(Argv("random-adapter", "--out", Dir(name), args));
    ASSERT_EQ(r.exit_code, 0) << r.output;
  }
  // Asserts the command (run by `run`) failed with an error, said `message`, and left neither the
  // output nor a temporary behind.
  Result ExpectRefused(const Args& args, const std::string& message,
                       Result (*run)(const Args&) = Fedlora) {
    const auto before = Entries();
    Result r = run(args);
    const std::string line = testing::CommandLine(args);
    EXPECT_GT(r.exit_code, 0) << line << " (-1: ended by a signal)";
    EXPECT_THAT(r.output, HasSubstr(message)) << line;
    EXPECT_THAT(r.output, HasSubstr("error: ")) << line;
    EXPECT_EQ(Entries(), before) << line << ": the failed command left files behind";
    return r;
  }
  std::set<std::string> Entries() const {
    std::set<std::string> out;
    for (const auto& e : fs::directory_iterator(scratch_.path())) out.insert(e.path().filename());
    return out;
  }
  testing::ScratchDir scratch_;
};

TEST_F(CliTest, AggregatesMixedRanksAndScalingsExactlyAsTheFormulas) {
  RandomAdapter("c0", {"--rank", "4", "--alpha", "8", "--seed", "1", "--in-features", "48",
                       "--out-features", "40"});
  RandomAdapter("c1", {"--rank", "8", "--alpha", "16", "--rslora", "--seed", "2", "--in-features",
                       "48", "--out-features", "40", "--dtype", "bf16"});
  RandomAdapter("c2", {"--rank", "2", "--alpha", "3", "--seed", "3", "--in-features", "48",
                       "--out-features", "40", "--dtype", "f16"});
  std::vector<common::Adapter> in;
  for (const char* c : {"c0", "c1", "c2"}) in.push_back(*common::ReadPeftAdapter(Dir(c)));
  EXPECT_DOUBLE_EQ(in[1].module(0).scaling, 16 / std::sqrt(8.0));
  const std::vector<double> p = {1.0 / 6, 2.0 / 6, 3.0 / 6};
  const Args inputs = {Dir("c0"), Dir("c1"), Dir("c2")};

  for (const char* method : {"fedit", "flora", "lora-fair"}) {
    const std::string out = Dir(std::string("out-") + method);
    // Weights are normalised: 10,20,30 is p = 1/6, 2/6, 3/6.
    Result r = Fedlora(
        Argv("aggregate", "--method", method, "--weights", "10,20,30", "--out", out, inputs));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    auto g = common::ReadPeftAdapter(out);  // also checks that config r matches the tensors
    ASSERT_TRUE(g.ok()) << g.status();
    for (size_t i = 0; i < g->num_modules(); ++i) {
      testing::MatrixD ideal = testing::MatrixD::Zero(40, 48),
                       a_bar = testing::MatrixD::Zero(8, 48), b_bar = testing::MatrixD::Zero(40, 8);
      for (size_t k = 0; k < 3; ++k) {
        ideal += p[k] * testing::DenseDelta(in[k], i);
        const int r_k = in[k].module(i).rank;
        a_bar.topRows(r_k) += p[k] * in[k].A(i).cast<double>();
        b_bar.leftCols(r_k) += p[k] * in[k].module(i).scaling * in[k].B(i).cast<double>();
      }
      const testing::MatrixD got = testing::DenseDelta(*g, i);
      if (std::string(method) == "flora") {
        EXPECT_EQ(g->module(i).rank, 14);
        EXPECT_LT(testing::RelativeDiff(got, ideal), 1e-5);
      } else {
        EXPECT_EQ(g->module(i).rank, 8);
        EXPECT_LT(testing::RelativeDiff(g->A(i).cast<double>(), a_bar), 1e-6);  // Ā kept by both
        if (std::string(method) == "fedit") {
          EXPECT_LT(testing::RelativeDiff(got, b_bar * a_bar), 1e-5);
        }
      }
    }
    EXPECT_THAT(r.output, HasSubstr("aggregated 3 adapters with " + std::string(method)));
  }
}

// `--weights 1,2 a/ b/` once failed with "Could not convert: --weights = 1,2,a/": the list option
// took the inputs after it. A comma-separated list option takes exactly one argument.
// Regression (issue 31): the README's commands with `--out global/` stopped with "cannot rename
// global/..tmp.N.0 to global/: Directory not empty" and left an empty global/ behind.
TEST_F(CliTest, OutputDirectoriesMayEndInASlash) {
  for (const char* site : {"site-a", "site-b"})
    RandomAdapter(std::string(site) + "/", {"--rank", "2", "--seed", site[5] == 'a' ? "1" : "2"});
  Result r = Fedlora({"aggregate", "--method", "lora-fair", "--weights", "1200,300", "--out",
                      Dir("global") + "/", Dir("site-a") + "/", Dir("site-b") + "/"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_TRUE(fs::exists(scratch_ / "global" / "adapter_model.safetensors"));
  EXPECT_EQ(Entries(), (std::set<std::string>{"global", "site-a", "site-b"}));  // no temporaries
  ExpectRefused({"aggregate", "--method", "fedit", "--out", Dir("again") + "/", Dir("missing")},
                "missing");
}

TEST_F(CliTest, RegressionAListOptionDoesNotSwallowTheInputsAfterIt) {
  RandomAdapter("a", {"--rank", "2", "--alpha", "4", "--seed", "1", "--in-features", "8",
                      "--out-features", "6"});
  RandomAdapter("b", {"--rank", "2", "--alpha", "4", "--seed", "2", "--in-features", "8",
                      "--out-features", "6"});
  Result r = Fedlora({"aggregate", "--method", "fedit", "--out", Dir("g"), "--weights", "1,2",
                      Dir("a"), Dir("b")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const common::Adapter a = *common::ReadPeftAdapter(Dir("a"));
  const common::Adapter b = *common::ReadPeftAdapter(Dir("b"));
  const common::Adapter g = *common::ReadPeftAdapter(Dir("g"));
  const testing::MatrixD a_bar = (a.A(0).cast<double>() + 2 * b.A(0).cast<double>()) / 3;
  EXPECT_LT(testing::RelativeDiff(g.A(0).cast<double>(), a_bar), 1e-6);
}

TEST_F(CliTest, FedSbAggregatesLoraSbAdapters) {
  RandomAdapter("s0",
                {"--lora-sb", "--rank", "6", "--alpha", "6", "--frozen-seed", "5", "--seed", "1"});
  RandomAdapter("s1",
                {"--lora-sb", "--rank", "6", "--alpha", "3", "--frozen-seed", "5", "--seed", "2"});
  Result r =
      Fedlora({"aggregate", "--method", "fed-sb", "--out", Dir("out"), Dir("s0"), Dir("s1")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto s0 = common::ReadPeftAdapter(Dir("s0")), s1 = common::ReadPeftAdapter(Dir("s1"));
  auto g = common::ReadPeftAdapter(Dir("out"));
  ASSERT_TRUE(g.ok()) << g.status();
  for (size_t i = 0; i < g->num_modules(); ++i) {
    const testing::MatrixD ideal =
        0.5 * testing::DenseDelta(*s0, i) + 0.5 * testing::DenseDelta(*s1, i);
    EXPECT_LT(testing::RelativeDiff(testing::DenseDelta(*g, i), ideal), 1e-5);
  }
  // Different frozen B, A are refused.
  RandomAdapter("s2",
                {"--lora-sb", "--rank", "6", "--alpha", "6", "--frozen-seed", "6", "--seed", "3"});
  ExpectRefused({"aggregate", "--method", "fed-sb", "--out", Dir("bad"), Dir("s0"), Dir("s2")},
                "fed-sb needs the frozen B and A shared by all clients");
}

// Writes a safetensors file for a one-module adapter by hand, so the test controls every header
// byte.
void WriteRawAdapter(const fs::path& dir, const std::string& header, size_t data_bytes) {
  fs::create_directories(dir);
  std::ofstream(dir / common::kAdapterConfigFile) << R"({"peft_type":"LORA","r":2,"lora_alpha":2})";
  uint64_t n = header.size();
  std::string bytes(reinterpret_cast<const char*>(&n), 8);
  bytes += header + std::string(data_bytes, '\0');
  std::ofstream(dir / common::kAdapterWeightsFile, std::ios::binary) << bytes;
}

TEST_F(CliTest, BadInputNeverProducesAnOutputAndSaysWhatIsWrong) {
  RandomAdapter("good", {"--rank", "4", "--seed", "1"});
  RandomAdapter("good2", {"--rank", "4", "--seed", "2"});
  RandomAdapter("layers3", {"--rank", "4", "--seed", "3", "--layers", "3"});
  RandomAdapter("wide", {"--rank", "4", "--seed", "4", "--in-features", "80"});
  const Args good = {Dir("good"), Dir("good2")};
  const Args out = {"--out", Dir("out")};

  // NaN and Inf, written through the library like a diverged client would.
  auto nan = common::ReadPeftAdapter(Dir("good2"));
  nan->B(1)(5, 2) = NAN;
  ASSERT_TRUE(common::WritePeftAdapter(*nan, Dir("nan")).ok());
  nan->B(1)(5, 2) = INFINITY;
  ASSERT_TRUE(common::WritePeftAdapter(*nan, Dir("inf")).ok());

  // Damaged safetensors files.
  const std::string weights = common::kAdapterWeightsFile;
  fs::copy(Dir("good2"), Dir("truncated"), fs::copy_options::recursive);
  fs::resize_file(Dir("truncated") + "/" + weights,
                  fs::file_size(Dir("truncated") + "/" + weights) - 100);
  fs::create_directories(Dir("shortheader"));
  fs::copy(Dir("good2") + "/" + common::kAdapterConfigFile, Dir("shortheader"));
  std::ofstream(Dir("shortheader") + "/" + weights)
      << std::string("\xff\xff\x00\x00\x00\x00\x00\x00{}", 10);
  const std::string a = R"("base_model.model.m.q_proj.lora_A.weight")",
                    b = R"("base_model.model.m.q_proj.lora_B.weight")";
  WriteRawAdapter(scratch_ / "outofrange",
                  "{" + a + R"(:{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]},)" + b +
                      R"(:{"dtype":"F32","shape":[4,2],"data_offsets":[32,64]}})",
                  48);
  WriteRawAdapter(scratch_ / "overlap",
                  "{" + a + R"(:{"dtype":"F32","shape":[2,4],"data_offsets":[0,32]},)" + b +
                      R"(:{"dtype":"F32","shape":[4,2],"data_offsets":[16,48]}})",
                  48);
  WriteRawAdapter(scratch_ / "dtype",
                  "{" + a + R"(:{"dtype":"Q4","shape":[2,4],"data_offsets":[0,32]},)" + b +
                      R"(:{"dtype":"F32","shape":[4,2],"data_offsets":[32,64]}})",
                  64);
  fs::copy(Dir("good2"), Dir("noconfig"), fs::copy_options::recursive);
  fs::remove(Dir("noconfig") + "/" + common::kAdapterConfigFile);

  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("layers3")),
                "has module model.layers.2.self_attn.q_proj, which client 0");
  ExpectRefused(Argv("aggregate", "--method", "flora", out, Dir("layers3"), good),
                "has no module model.layers.2");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("wide")),
                "adapts a 64x64 layer");
  ExpectRefused(Argv("aggregate", "--method", "lora-fair", out, good, Dir("nan")),
                "lora_B holds a non-finite value (nan)");
  ExpectRefused(Argv("aggregate", "--method", "flora", out, good, Dir("inf")),
                "non-finite value (inf)");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("truncated")),
                "offsets out of range");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("shortheader")),
                "the header length field exceeds");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("outofrange")),
                "offsets out of range");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("overlap")), "overlap");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("dtype")),
                "unknown dtype 'Q4'");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("noconfig")), "missing");
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("nothere")),
                "is not a directory");
  ExpectRefused(Argv("aggregate", "--method", "fedavg", out, good), "unknown method 'fedavg'");
  // Regressions: lora_alpha 1e300 exited 0 with an all-inf adapter and an error of 0; finite
  // values near float's limit overflow in the sum and must not be written either.
  fs::copy(Dir("good2"), Dir("alpha"), fs::copy_options::recursive);
  std::ofstream(Dir("alpha") + "/" + common::kAdapterConfigFile)
      << R"({"peft_type":"LORA","r":4,"lora_alpha":1e300})";
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, good, Dir("alpha")),
                "scaling 2.5e+299 is outside [-10000, 10000]");
  auto huge = common::ReadPeftAdapter(Dir("good2"));
  huge->B(0).setConstant(3e38f);
  ASSERT_TRUE(common::WritePeftAdapter(*huge, Dir("huge")).ok());
  ExpectRefused(Argv("aggregate", "--method", "fedit", out, Dir("huge"), Dir("huge")),
                "the aggregate is not finite");
  ExpectRefused(Argv("aggregate", "--method", "fedit", "--weights", "1,2,3", out, good),
                "3 weights given for 2 adapters");
  ExpectRefused(Argv("aggregate", "--method", "fedit", "--out", Dir("good2"), good),
                "already exists");
  ExpectRefused(Argv("aggregate", "--method", "fed-sb", out, good), "has no lora_R");
}

TEST_F(CliTest, InspectShowsModulesAndWhatCanBeAggregated) {
  RandomAdapter("x", {"--rank", "4", "--alpha", "8", "--seed", "1"});
  RandomAdapter("y", {"--rank", "8", "--alpha", "8", "--seed", "2"});
  Result r = Fedlora({"inspect", Dir("x"), Dir("y")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("model.layers.1.self_attn.v_proj"));
  EXPECT_THAT(r.output, HasSubstr("2.0000"));  // scaling 8/4
  EXPECT_THAT(r.output, HasSubstr("fedit      ok"));
  EXPECT_THAT(r.output, HasSubstr("fed-sb     no: "));
  Result bad = Fedlora({"inspect", Dir("nothere")});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_THAT(bad.output, HasSubstr("is not a directory"));
  // Regression: an adapter holding NaN was inspected with exit code 0.
  auto nan = common::ReadPeftAdapter(Dir("x"));
  nan->A(0)(0, 0) = NAN;
  ASSERT_TRUE(common::WritePeftAdapter(*nan, Dir("nan")).ok());
  bad = Fedlora({"inspect", Dir("nan")});
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_THAT(bad.output, HasSubstr("lora_A holds a non-finite value (nan)"));
}

TEST_F(CliTest, PrivacyComputesEpsilonAndTheNoiseForATarget) {
  // The reference case of ALGORITHMS.md, through the program: ε = 7.32911117143 at order 3.9.
  Result r = Fedlora({"privacy", "--noise-multiplier", "1.5", "--sample-rate", "0.04", "--steps",
                      "2250", "--delta", "1e-5", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  auto j = testing::LastJsonLine(r.output);
  EXPECT_NEAR(j["epsilon"].get<double>(), 7.32911117143, 1e-9);
  EXPECT_DOUBLE_EQ(j["order"].get<double>(), 3.9);
  r = Fedlora({"privacy", "--epsilon", "8", "--sample-rate", "0.04", "--steps", "2250", "--delta",
               "1e-5", "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  j = testing::LastJsonLine(r.output);
  EXPECT_NEAR(j["noise_multiplier"].get<double>(), 1.416, 5e-4);
  EXPECT_LE(j["epsilon"].get<double>(), 8.0);
  r = Fedlora({"privacy", "--sample-rate", "0.04", "--steps", "10"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("give exactly one of --noise-multiplier"));
  r = Fedlora({"privacy", "--noise-multiplier", "1", "--sample-rate", "2", "--steps", "10"});
  EXPECT_THAT(r.output, HasSubstr("sample rate is 2"));
}

// Instruction records with a learnable answer: the word that names a number's remainder mod 3.
void WriteRuleData(const fs::path& path, int first, int count) {
  static const char* kNames[] = {"zero", "one", "two"};
  std::ofstream out(path);
  for (int i = first; i < first + count; ++i)
    out << nlohmann::json({{"instruction", "What is " + std::to_string(i) + " modulo 3?"},
                           {"input", ""},
                           {"output", std::string("It is ") + kNames[i % 3] + "."}})
               .dump()
        << "\n";
}

TEST_F(CliTest, TrainEvalAndMergeAgreeOnATinyModel) {
  WriteRuleData(scratch_ / "train.jsonl", 0, 96);
  WriteRuleData(scratch_ / "test.jsonl", 1000, 24);
  Result r =
      Fedlora({"init-model", "--preset", "tiny", "--seed", "3", "--init-std", "0.1", "--merges",
               "40", "--tokenizer-corpus", Dir("train.jsonl"), "--out", Dir("model")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json"})
    EXPECT_TRUE(fs::exists(scratch_ / "model" / f)) << f;

  r = Fedlora({"eval", "--model", Dir("model"), "--data", Dir("test.jsonl"), "--json"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const double base = testing::LastJsonLine(r.output)["loss"];
  const int64_t tokens = testing::LastJsonLine(r.output)["tokens"];

  for (const std::string method : {"lora", "lora-sb"}) {
    SCOPED_TRACE(method);
    const std::string out = Dir("adapter-" + method);
    r = Fedlora(Argv("train", "--model", Dir("model"), "--data", Dir("train.jsonl"), "--eval-data",
                     Dir("test.jsonl"), "--out", out, "--method", method, "--rank", "4",
                     "--targets", "q_proj,v_proj,up_proj,down_proj", "--batch", "8", "--seq", "256",
                     "--epochs", "4", "--lr", "1e-2", "--json"));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    const nlohmann::json train = testing::LastJsonLine(r.output);
    EXPECT_GT(train["tokens_per_second"].get<double>(), 0);
    EXPECT_EQ(train["steps"], 48);  // 96 records / 8 × 4 epochs
    EXPECT_NEAR(train["eval_loss_before"].get<double>(),
                method == "lora" ? base : train["eval_loss_before"].get<double>(), 1e-9);
    EXPECT_LT(train["eval_loss"].get<double>(), 0.7 * base) << r.output;

    // The written adapter gives the loss training measured, and folding its delta into the
    // weights gives the same loss again.
    r = Fedlora(Argv("eval", "--model", Dir("model"), "--adapter", out, "--data", Dir("test.jsonl"),
                     "--json"));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    // Equal up to float rounding (the products of a batch round differently with its padding).
    EXPECT_NEAR(testing::LastJsonLine(r.output)["loss"].get<double>(),
                train["eval_loss"].get<double>(), 1e-6);
    EXPECT_EQ(testing::LastJsonLine(r.output)["tokens"], tokens);
    r = Fedlora(
        Argv("merge", "--model", Dir("model"), "--adapter", out, "--out", Dir("merged-" + method)));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    r = Fedlora(
        {"eval", "--model", Dir("merged-" + method), "--data", Dir("test.jsonl"), "--json"});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NEAR(testing::LastJsonLine(r.output)["loss"].get<double>(),
                train["eval_loss"].get<double>(), 1e-5 * train["eval_loss"].get<double>());
  }
  // DP-SGD at a budget: the run spends (to the solver's precision) the ε asked for and still
  // learns.
  r = Fedlora(Argv("train", "--model", Dir("model"), "--data", Dir("train.jsonl"), "--eval-data",
                   Dir("test.jsonl"), "--out", Dir("adapter-dp"), "--rank", "4", "--targets",
                   "q_proj,v_proj", "--batch", "8", "--seq", "256", "--steps", "24", "--lr", "1e-2",
                   "--target-epsilon", "4", "--dp-clip", "1", "--json"));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const nlohmann::json dp = testing::LastJsonLine(r.output);
  EXPECT_LE(dp["epsilon"].get<double>(), 4.0);
  EXPECT_GT(dp["epsilon"].get<double>(), 3.99);
  EXPECT_DOUBLE_EQ(dp["sample_rate"].get<double>(), 8.0 / 96);
  EXPECT_LT(dp["eval_loss"].get<double>(), dp["eval_loss_before"].get<double>());

  auto adapter = common::ReadPeftAdapter(scratch_ / "adapter-lora-sb");
  ASSERT_TRUE(adapter.ok()) << adapter.status();
  EXPECT_TRUE(adapter->module(0).has_r);

  // Refusals leave nothing behind and say what is wrong.
  std::ofstream(scratch_ / "bad.jsonl") << "{\"text\": \"fine\"}\n{\"prompt\": 1}\n";
  ExpectRefused({"eval", "--model", Dir("model"), "--data", Dir("bad.jsonl")},
                "bad.jsonl:2: expected");
  RandomAdapter("other",
                {"--layers", "1", "--rank", "2", "--in-features", "32", "--out-features", "32"});
  ExpectRefused(
      {"eval", "--model", Dir("model"), "--adapter", Dir("other"), "--data", Dir("test.jsonl")},
      "another base model");
  ExpectRefused({"train", "--model", Dir("model"), "--data", Dir("train.jsonl"), "--out",
                 Dir("adapter-lora"), "--steps", "1"},
                "exists");
  ExpectRefused({"merge", "--model", Dir("model"), "--adapter", Dir("other"), "--out", Dir("m2")},
                "another base model");
  r = Fedlora({"init-model", "--preset", "huge", "--out", Dir("m3")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("unknown preset \"huge\"; expected one of tiny, tiny-llama3"));
  EXPECT_FALSE(fs::exists(scratch_ / "m3"));
}

// A bf16 checkpoint is used as stored, and every path out of it — eval, merge, export-gguf —
// gives what the same values stored as f32 give (the f32 paths are checked against the float64
// reference and llama.cpp elsewhere).
TEST_F(CliTest, Bf16CheckpointGivesWhatItsValuesInF32Give) {
  WriteRuleData(scratch_ / "test.jsonl", 1000, 12);
  // Both named "model" (GGUF files carry the directory's name).
  fs::create_directories(scratch_ / "bf16");
  fs::create_directories(scratch_ / "f32");
  Result r = Fedlora({"init-model", "--preset", "tiny-llama3", "--seed", "4", "--init-std", "0.1",
                      "--dtype", "bf16", "--out", Dir("bf16/model")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto file =
      common::SafetensorsFile::Open(scratch_ / "bf16" / "model" / "model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->view().tensors()[0].dtype, common::DType::kBF16);
  const auto weights = common::LlamaWeights::Read(scratch_ / "bf16" / "model");
  ASSERT_TRUE(weights.ok()) << weights.status();
  ASSERT_TRUE(weights
                  ->WriteModelDirectory(scratch_ / "f32" / "model", scratch_ / "bf16" / "model",
                                        common::DType::kF32, false)
                  .ok());
  RandomAdapter("adapter",
                {"--model", Dir("bf16/model"), "--rank", "2", "--targets", "q_proj,v_proj"});
  auto eval = [&](const std::string& model, const std::string& adapter) {
    std::vector<std::string> argv = {"eval",   "--model",         Dir(model),
                                     "--data", Dir("test.jsonl"), "--json"};
    if (!adapter.empty()) argv.insert(argv.end(), {"--adapter", Dir(adapter)});
    const Result e = Fedlora(argv);
    EXPECT_EQ(e.exit_code, 0) << e.output;
    return testing::LastJsonLine(e.output)["loss"].get<double>();
  };
  for (const char* adapter : {"", "adapter"}) {
    SCOPED_TRACE(adapter);
    const double loss = eval("f32/model", adapter);
    EXPECT_NEAR(eval("bf16/model", adapter), loss, 1e-6 * loss);  // the products split differently
    for (const char* model : {"bf16", "f32"}) {
      std::vector<std::string> argv = {"export-gguf",
                                       "--dtype",
                                       "bf16",
                                       "--model",
                                       Dir(std::string(model) + "/model"),
                                       "--out",
                                       Dir(std::string(model) + adapter + ".gguf")};
      if (*adapter) argv.insert(argv.end(), {"--adapter", Dir(adapter)});
      ASSERT_EQ(Fedlora(argv).exit_code, 0);
    }
    EXPECT_EQ(testing::ReadText(scratch_ / (std::string("bf16") + adapter + ".gguf")),
              testing::ReadText(scratch_ / (std::string("f32") + adapter + ".gguf")));
  }
  // Merged without --dtype: in the checkpoint's type, evaluating as the adapter on the base up to
  // the rounding of W0 + s·B·A to bf16.
  ASSERT_EQ(Fedlora({"merge", "--model", Dir("bf16/model"), "--adapter", Dir("adapter"), "--out",
                     Dir("merged")})
                .exit_code,
            0);
  const auto merged = common::SafetensorsFile::Open(scratch_ / "merged" / "model.safetensors");
  ASSERT_TRUE(merged.ok()) << merged.status();
  for (const common::TensorInfo& t : merged->view().tensors())
    EXPECT_EQ(t.dtype, common::DType::kBF16) << t.name;
  const double with_adapter = eval("bf16/model", "adapter");
  EXPECT_NEAR(eval("merged", ""), with_adapter, 1e-3 * with_adapter);
}

// Every family's checkpoint from tests/fixtures/make_model_families.py, an independent writer
// whose float64 PyTorch forward follows transformers' modeling code: `fedlora eval` matches its
// loss with and without a LoRA and a LoRA-SB adapter, and a merged model written by `fedlora
// merge` (whose config.json fedlora writes for the family) evaluates as the model with the adapter.
class ModelFamilyTest : public CliTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(ModelFamilyTest, EvalMatchesFloat64ReferenceAndMergeKeepsTheArchitecture) {
  const fs::path dir = fs::path(FEDLORA_SOURCE_DIR) / "tests/fixtures/families" / GetParam();
  std::ifstream in(dir / "expected.json");
  const nlohmann::json expected = nlohmann::json::parse(in);
  // 16 positions: past llama-dynamic's max_position_embeddings of 10, as its records are.
  auto eval = [&](const std::string& model, const std::string& adapter) {
    Result r = Fedlora(Argv("eval", "--json", "--max-length", "16", "--model", model, "--data",
                            (dir / "data.jsonl").string(),
                            adapter.empty() ? Args{} : Args{"--adapter", adapter}));
    EXPECT_EQ(r.exit_code, 0) << r.output;
    return testing::LastJsonLine(r.output);
  };
  for (const char* adapter : {"base", "lora", "lora_sb"}) {
    const bool base = std::string(adapter) == "base";
    const nlohmann::json got = eval(dir.string(), base ? "" : (dir / adapter).string());
    const double want = expected[adapter]["loss"];
    EXPECT_NEAR(got["loss"].get<double>(), want, 1e-5 * want) << adapter;
    EXPECT_EQ(got["tokens"], expected[adapter]["tokens"]) << adapter;
    if (base) continue;
    const std::string merged = Dir(std::string("merged-") + adapter);
    Result r = Fedlora(
        {"merge", "--model", dir.string(), "--adapter", (dir / adapter).string(), "--out", merged});
    ASSERT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NEAR(eval(merged, "")["loss"].get<double>(), want, 1e-5 * want) << adapter << " merged";
  }
}

// What a user checks before bringing a model: its architecture and LoRA targets, and its
// tokenizer's ids for their texts.
TEST_F(CliTest, InspectModelAndTokenize) {
  Result r = Fedlora({"init-model", "--preset", "tiny-qwen3", "--out", Dir("qwen3")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  r = Fedlora({"inspect", "--model", Dir("qwen3")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_THAT(r.output, HasSubstr("family: qwen3 (Qwen3ForCausalLM)"));
  EXPECT_THAT(r.output, HasSubstr("head_dim 32, full causal, RMSNorm on each head of q and k"));
  EXPECT_THAT(r.output, HasSubstr("q_proj     [128 x 64]  model.layers.0.self_attn.q_proj"));
  // embed 259×64, 2 × (2 norms of 64, q 128×64, k and v 64×64, o 64×128, 3 MLP 192×64, q/k norms of
  // 32), final norm: 16576 + 2·61632 + 64 parameters in 1 + 2·11 + 1 tensors.
  EXPECT_THAT(r.output, HasSubstr("parameters: 139904, 559616 bytes as f32"));
  EXPECT_THAT(r.output,
              HasSubstr("1 file, 24 F32 tensors, 139904 parameters, as config.json says"));
  EXPECT_THAT(r.output, HasSubstr("tokenizer: supported: BPE"));
  EXPECT_THAT(r.output, HasSubstr("llama.cpp (export-gguf): can be exported"));
  const fs::path fixtures = fs::path(FEDLORA_SOURCE_DIR) / "tests/fixtures/families";
  r = Fedlora({"inspect", "--model", (fixtures / "llama3").string()});
  EXPECT_THAT(r.output, HasSubstr("llama3 scaling (factor 8, low 1, high 4, original context 64)"));
  EXPECT_THAT(r.output, HasSubstr("tokenizer: none"));
  r = Fedlora({"inspect", "--model", (fixtures / "qwen2").string()});
  EXPECT_THAT(r.output,
              HasSubstr("sliding window of 6 on layers 1, biases on q_proj, k_proj, v_proj"));
  std::ofstream(scratch_ / "gemma.json") << R"({"model_type": "gemma3_text"})";
  fs::create_directories(scratch_ / "gemma");
  fs::rename(scratch_ / "gemma.json", scratch_ / "gemma" / "config.json");
  ExpectRefused({"inspect", "--model", Dir("gemma")}, "Gemma scales the embeddings");

  // tokenize: one JSON line per text; without --add-special no BOS/EOS.
  r = Fedlora({"tokenize", "--model", Dir("qwen3"), "--text", "ab<|endoftext|>", "--show-text"});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto line = nlohmann::json::parse(r.output);
  const std::vector<int> ids = line["ids"];
  ASSERT_EQ(ids.size(), 3u);  // the corpus-less byte-level tokenizer: a, b, then the token
  EXPECT_EQ(ids[0], 'a');
  EXPECT_EQ(line["text"], "ab<|endoftext|>");
  std::ofstream(scratch_ / "texts.jsonl") << "\"one\"\n\"two\"\n{\"text\": 3}\n";
  r = Fedlora({"tokenize", "--model", Dir("qwen3"), "--input", Dir("texts.jsonl")});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.output, HasSubstr("{\"ids\":[111,110,101]}\n{\"ids\":[116,119,111]}"));
  EXPECT_THAT(r.output, HasSubstr("texts.jsonl:3: expected a JSON string"));
  ExpectRefused({"tokenize", "--model", Dir("qwen3")}, "tokenize needs --text or --input");
}

// Regression (issue 29): export-gguf and eval on a config.json of 100000 layers allocated 19.5 GB
// before looking at the checkpoint (10^6 layers, hidden_size 2^30: std::bad_alloc and SIGABRT),
// and inspect --model called a config of 1000 layers over a 2-layer checkpoint exportable. In 2 GB
// of address space each is refused, saying what config.json says and what came.
TEST_F(CliTest, ConfigsOverTheCapsOrBesideTheCheckpointAreRefusedBeforeAllocating) {
  const std::string model = Dir("model");
  Result r = Fedlora({"init-model", "--preset", "tiny", "--out", model});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ofstream(scratch_ / "data.jsonl") << R"({"input_ids": [1, 2, 3, 4, 5]})"
                                         << "\n";
  r = FedloraIn2Gb({"eval", "--model", model, "--data", Dir("data.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << "the limit alone must not refuse the model: " << r.output;
  const nlohmann::json config = nlohmann::json::parse(testing::ReadText(model + "/config.json"));
  // The tiny preset, tied: embed V·64, a final norm of 64, and per layer 9 tensors: 2 norms of 64,
  // q and o 64·64, k and v 32·64, 3 MLP 192·64.
  const int64_t V = config["vocab_size"], layer = 2 * 64 + 2 * 64 * 64 + 2 * 32 * 64 + 3 * 192 * 64;
  const int64_t deep = V * 64 + 64 + 1000 * layer, shallow = V * 64 + 64 + 2 * layer;
  const struct {
    const char* key;
    int value;
    std::string says;
  } cases[] = {
      {"num_hidden_layers", 100000, "num_hidden_layers is 100000; fedlora takes at most 1024"},
      {"num_hidden_layers", 1000000, "num_hidden_layers is 1000000; fedlora takes at most 1024"},
      {"hidden_size", 1 << 30, "hidden_size is 1073741824; fedlora takes at most 65536"},
      {"num_hidden_layers", 1000,
       common::StrCat("config.json says 9002 tensors of ", deep, " parameters (", 4 * deep,
                      " bytes as f32), the checkpoint has 20 tensors of ", shallow,
                      " parameters and no model.layers.2.input_layernorm.weight [64]")},
      {"hidden_size", 65536,
       common::StrCat("config.json says model.embed_tokens.weight is [", V, ",65536], ",
                      "the checkpoint has [", V, ",64]")},
  };
  for (const auto& c : cases) {
    fs::remove_all(Dir("bad"));
    fs::copy(model, Dir("bad"), fs::copy_options::recursive);
    nlohmann::json bad = config;
    bad[c.key] = c.value;
    std::ofstream(Dir("bad") + "/config.json") << bad.dump();
    ExpectRefused({"export-gguf", "--model", Dir("bad"), "--out", Dir("out.gguf")}, c.says,
                  FedloraIn2Gb);
    ExpectRefused({"eval", "--model", Dir("bad"), "--data", Dir("data.jsonl")}, c.says,
                  FedloraIn2Gb);
    r = ExpectRefused({"inspect", "--model", Dir("bad")}, c.says, FedloraIn2Gb);
    EXPECT_THAT(r.output, Not(HasSubstr("can be exported"))) << c.key << " " << c.value;
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, ModelFamilyTest,
                         ::testing::Values("llama3", "llama-linear-bias", "llama-dynamic",
                                           "mistral", "qwen2", "qwen3"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::erase(name, '-');
                           return name;
                         });

// A model whose greedy generation is known by construction: every decoder layer's linears are zero,
// so the residual stream at a position is its token's embedding, and the final state (an RMSNorm
// of that one-hot row) selects one row of the LM head. Token t's embedding is the unit vector e_j
// of its place j in the chain "\n" → "a" → "n" → "s" → "w" → "e" → "r" → "2" → EOS, and the head's
// row of its successor is 10·e_j: after any prompt (which ends in "\n") the model answers
// "answer2" and stops.
TEST_F(CliTest, EvalAccuracyScoresAModelWhoseAnswersAreKnown) {
  const std::string model = Dir("model");
  ASSERT_EQ(Fedlora({"init-model", "--preset", "tiny", "--merges", "0", "--out", model}).exit_code,
            0);
  auto loaded = common::LoadModel(model);
  ASSERT_TRUE(loaded.ok()) << loaded.status();
  common::LlamaConfig c = loaded->weights.config();
  const int H = c.hidden_size, V = c.vocab_size;
  std::vector<int32_t> chain;
  for (const char* piece : {"\n", "a", "n", "s", "w", "e", "r", "2"}) {
    const std::vector<int32_t> ids = loaded->tokenizer->Encode(piece);
    ASSERT_EQ(ids.size(), 1u) << piece;
    chain.push_back(ids[0]);
  }
  chain.push_back(c.eos_token_ids.at(0));
  std::vector<std::vector<float>> storage;
  std::vector<common::TensorToWrite> tensors;
  for (const common::TensorToWrite& t : loaded->weights.Tensors()) {
    std::vector<float> v = t.data.ToVector();
    if (t.name.find("_proj") != std::string::npos) std::fill(v.begin(), v.end(), 0.0f);
    if (t.name == "model.embed_tokens.weight") {
      std::fill(v.begin(), v.end(), 0.0f);
      for (size_t j = 0; j + 1 < chain.size(); ++j) v[chain[j] * H + j] = 1.0f;
    }
    storage.push_back(std::move(v));
    tensors.push_back({t.name, t.shape, storage.back()});
  }
  std::vector<float> head(static_cast<size_t>(V) * H, 0.0f);
  for (size_t j = 0; j + 1 < chain.size(); ++j) head[chain[j + 1] * H + j] = 10.0f;
  tensors.push_back({"lm_head.weight", {V, H}, head});
  c.tie_word_embeddings = false;
  ASSERT_TRUE(common::WriteFileAtomically(fs::path(model) / "config.json",
                                          common::LlamaConfigJson(c).dump(2))
                  .ok());
  ASSERT_TRUE(common::WriteSafetensors(fs::path(model) / "model.safetensors", tensors,
                                       common::DType::kF32, {{"format", "pt"}})
                  .ok());

  // Five records with answers, two of them answer2; one without an answer, which only the loss
  // sees.
  const std::string data = Dir("data.jsonl");
  {
    std::ofstream out(data);
    auto record = [&](const std::string& format, const std::string& answer) {
      out << nlohmann::json({{"instruction", "Pick one.\n\nAnswer format: " + format},
                             {"input", ""},
                             {"output", "the correct answer is " + answer},
                             {"answer", answer}})
                 .dump()
          << "\n";
    };
    record("answer1/answer2/answer3", "answer2");
    record("answer1/answer2/answer3", "answer1");
    record("answer1/answer2/answer3/answer4", "answer2");
    record("answer1/answer2/answer3/answer4", "answer3");
    record("true/false", "true");
    out << R"({"instruction": "No answer here.", "output": "x"})"
        << "\n";
  }
  Result r = Fedlora({"eval", "--model", model, "--data", data, "--accuracy", "--json",
                      "--responses", Dir("responses.jsonl")});
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto summary = testing::LastJsonLine(r.output);
  EXPECT_EQ(summary["answered"], 5);
  EXPECT_EQ(summary["correct"], 2);
  EXPECT_DOUBLE_EQ(summary["accuracy"].get<double>(), 0.4);
  EXPECT_EQ(summary["records"], 6);
  std::ifstream responses(Dir("responses.jsonl"));
  std::string line;
  std::vector<bool> verdicts;
  while (std::getline(responses, line)) {
    const auto j = nlohmann::json::parse(line);
    EXPECT_EQ(j["response"], "answer2");
    verdicts.push_back(j["correct"]);
  }
  EXPECT_EQ(verdicts, (std::vector<bool>{true, false, true, false, false}));

  // generate --data gives the same responses, EOS included in the ids; sampling at a low
  // temperature cannot leave a chain whose logits differ by 10·√64.
  for (const Args& sampling :
       {Args{}, Args{"--temperature", "0.5", "--top-p", "0.9", "--seed", "3"}}) {
    r = Fedlora(Argv("generate", "--model", model, "--data", data, "--json", sampling));
    ASSERT_EQ(r.exit_code, 0) << r.output;
    std::istringstream lines(r.output);
    int n = 0;
    while (std::getline(lines, line)) {
      const auto j = nlohmann::json::parse(line);
      EXPECT_EQ(j["text"], "answer2");
      EXPECT_EQ(j["ids"], std::vector<int32_t>(chain.begin() + 1, chain.end()));
      ++n;
    }
    EXPECT_EQ(n, 6);
  }
  EXPECT_EQ(Fedlora({"generate", "--model", model}).exit_code, 1);
  std::ofstream(Dir("empty.jsonl")).flush();
  r = Fedlora({"generate", "--model", model, "--data", Dir("empty.jsonl")});
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.output, HasSubstr("empty.jsonl has no records"));
}

}  // namespace
}  // namespace fedlora
