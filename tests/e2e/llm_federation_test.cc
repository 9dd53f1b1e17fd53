// The llm workload end to end: tiny models of each family fine-tuned by real client processes,
// the coordinator evaluating and exporting; DP-SGD clients.
#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace testing {

// A federation of `llm` clients fine-tuning a tiny model of `preset`'s architecture with `method`:
// held-out loss falls, and the exported merged model, evaluated by another process, has the loss
// the coordinator measured on the base with the global adapter.
void LlmFixture::FineTune(const std::string& method, const std::string& preset,
                          const std::string& targets, const std::string& dtype) {
  const fs::path data = dir_ / "data", model = dir_ / "model";
  Fedlora({"make-data", "--out", data.string(), "--clients", "3", "--records", "48",
           "--test-records", "24", "--alpha", "0.5", "--seed", "1"});
  Fedlora({"init-model", "--preset", preset, "--seed", "2", "--init-std", "0.1", "--merges", "60",
           "--tokenizer-corpus", (data / "client-1.jsonl").string(), "--dtype", dtype, "--out",
           model.string()});
  const double base_loss = EvalLoss(model);

  RunFederation(
      method,
      {"--rounds", "2", "--base-model-dir", model.string(), "--export-gguf", "f32", "--eval-data",
       (data / "test.jsonl").string(), "--eval-accuracy", "--eval-max-new-tokens", "8",
       "--target-modules", targets, "--local-steps", "6",
       // Fed-SB trains only R (r² values per module) in a random subspace: it wants a larger step.
       "--learning-rate", method == "fed-sb" ? "0.1" : "0.01"},
      [&](int i) {
        return std::vector<std::string>{
            "--workload",      "llm",
            "--model",         model.string(),
            "--data",          (data / ("client-" + std::to_string(i) + ".jsonl")).string(),
            "--batch",         "8",
            "--eval-examples", "16"};
      });

  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 2u);
  for (const auto& m : metrics) ASSERT_TRUE(m.contains("eval_loss")) << m.dump();
  const double final_loss = metrics.back()["eval_loss"];
  EXPECT_LT(final_loss, 0.9 * base_loss) << "base " << base_loss;
  EXPECT_LT(metrics[1]["eval_loss"].get<double>(), metrics[0]["eval_loss"].get<double>());
  const fs::path exported = dir_ / "state" / "export";
  if (dtype == "f32") {
    EXPECT_NEAR(EvalLoss(exported / "merged"), final_loss, 1e-5 * final_loss);
  } else {
    // The export is in the checkpoint's type: W0 + s·B·A rounded to it, every matrix.
    const auto file = common::SafetensorsFile::Open(exported / "merged" / "model.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    for (const common::TensorInfo& t : file->view().tensors())
      EXPECT_EQ(common::DTypeName(t.dtype), common::DTypeName(*common::ParseDType(dtype)))
          << t.name;
    // Unrounded (merged to f32 by `fedlora merge`) it evaluates to the coordinator's loss, and
    // the rounding moves the loss by little.
    Fedlora({"merge", "--model", model.string(), "--adapter", (exported / "global").string(),
             "--dtype", "f32", "--out", (dir_ / "merged-f32").string()});
    EXPECT_NEAR(EvalLoss(dir_ / "merged-f32"), final_loss, 1e-5 * final_loss);
    const double rounded = EvalLoss(exported / "merged");
    std::printf("%s export: held-out loss %.7f, the coordinator's %.7f\n", dtype.c_str(), rounded,
                final_loss);
    EXPECT_NEAR(rounded, final_loss, 1e-3 * final_loss);  // measured: 3e-5 to 5e-5 of it
  }
  // The accuracy of greedy answers, as `fedlora eval --accuracy` finds it on the merged export.
  // The merged weights' logits differ from base + adapter in the last bits, which could flip one
  // near-tied argmax: one record of the 24 is the tolerance.
  const auto scored =
      Fedlora({"eval", "--accuracy", "--max-new-tokens", "8", "--model",
               (exported / "merged").string(), "--data", (data / "test.jsonl").string(), "--json"});
  ASSERT_EQ(scored["answered"], 24);
  for (const auto& m : metrics) {
    ASSERT_TRUE(m.contains("eval_accuracy")) << m.dump();
    const double a = m["eval_accuracy"];
    EXPECT_EQ(a * 24, std::round(a * 24)) << "not a count of 24 records: " << a;
    // Per category: six of 4 records each, whose mean is the whole set's accuracy.
    ASSERT_EQ(m["eval_accuracy_by_task"].size(), 6u) << m.dump();
    double mean = 0;
    for (const auto& [task, by_task] : m["eval_accuracy_by_task"].items())
      mean += by_task.get<double>() / 6;
    EXPECT_NEAR(mean, a, 1e-12);
  }
  EXPECT_NEAR(scored["accuracy"].get<double>(), metrics.back()["eval_accuracy"].get<double>(),
              1.0 / 24 + 1e-12);
  if (method == "flora") {  // each client holds the same merged base
    EXPECT_NEAR(EvalLoss(dir_ / "run-out1" / "model"), final_loss, 1e-5 * final_loss);
  }
  // The coordinator's GGUF files are what `fedlora export-gguf` makes of its global adapter (the
  // files themselves are checked in llama.cpp by e2e.GgufExportsMatchLlamaCpp). FLoRA's merged
  // weights add each round's delta in turn, so they differ from a merge of the stacked adapter in
  // the last bits: its model file is left out.
  const std::string global = (exported / "global").string();
  Fedlora({"export-gguf", "--lora", "--model", model.string(), "--adapter", global, "--out",
           (dir_ / "adapter.gguf").string()});
  EXPECT_EQ(testing::ReadText(exported / "gguf" / "adapter.gguf"),
            testing::ReadText(dir_ / "adapter.gguf"));
  if (method != "flora") {
    Fedlora({"export-gguf", "--dtype", "f32", "--model", model.string(), "--adapter", global,
             "--out", (dir_ / "model.gguf").string()});
    EXPECT_EQ(testing::ReadText(exported / "gguf" / "model.gguf"),
              testing::ReadText(dir_ / "model.gguf"));
  }
}

}  // namespace testing

namespace {

using namespace fedlora::testing;  // the fixture

// Held-out records whose responses all fall past --eval-max-length would give a held-out loss of
// nothing, reported as 0: the coordinator refuses to start instead, saying what to raise.
TEST_F(LlmFixture, HeldOutDataWithNoTargetWithinTheLengthIsRefusedAtStart) {
  const fs::path data = dir_ / "data", model = dir_ / "model";
  Fedlora({"make-data", "--out", data.string(), "--clients", "1", "--records", "8",
           "--test-records", "6"});
  Fedlora({"init-model", "--preset", "tiny", "--out", model.string()});
  const pid_t pid = Track(
      testing::Start({kBin + "/fedlora-server", "--method", "fedit", "--insecure", "--state-dir",
                      (dir_ / "state").string(), "--base-model-dir", model.string(), "--eval-data",
                      (data / "test.jsonl").string(), "--eval-max-length", "16"},
                     dir_ / "server.log"));
  EXPECT_NE(testing::Wait(pid, std::chrono::seconds(20)), 0);
  EXPECT_THAT(testing::ReadText(dir_ / "server.log"),
              HasSubstr("no record keeps a target token within 16 tokens; raise eval_max_length"));
}

class LlmFederation : public LlmFixture, public ::testing::WithParamInterface<std::string> {};

TEST_P(LlmFederation, ClientsFineTuneATinyModelAndHeldOutLossFalls) {
  FineTune(GetParam(), "tiny", "q_proj,v_proj,up_proj,down_proj");
}

INSTANTIATE_TEST_SUITE_P(Methods, LlmFederation,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::erase(name, '-');
                           return name;
                         });

// A base checkpoint in bf16, which clients and coordinator compute with as stored.
class Bf16Federation : public LlmFixture, public ::testing::WithParamInterface<std::string> {};

TEST_P(Bf16Federation, ClientsFineTuneABf16CheckpointAsStored) {
  FineTune(GetParam(), "tiny", "q_proj,v_proj,up_proj,down_proj", "bf16");
}

INSTANTIATE_TEST_SUITE_P(Methods, Bf16Federation, ::testing::Values("fedit", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::erase(name, '-');
                           return name;
                         });

// The same on each family's tiny preset: Llama 3.2's rope scaling, Qwen2's biases, Qwen3's q/k
// norms, Mistral's sliding window (32 positions, shorter than the records), each with another
// method and set of LoRA targets.
struct FamilyRun {
  const char* preset;
  const char* method;
  const char* targets;
};

class FamilyFederation : public LlmFixture, public ::testing::WithParamInterface<FamilyRun> {};

TEST_P(FamilyFederation, ClientsFineTuneAndTheMergedExportEvaluatesAsTheCoordinatorSaid) {
  FineTune(GetParam().method, GetParam().preset, GetParam().targets);
}

INSTANTIATE_TEST_SUITE_P(
    Presets, FamilyFederation,
    ::testing::Values(FamilyRun{"tiny-llama3", "fed-sb", "q_proj,k_proj,v_proj,o_proj"},
                      FamilyRun{"tiny-qwen2", "fedit",
                                "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"},
                      FamilyRun{"tiny-qwen3", "lora-fair", "q_proj,k_proj,v_proj,down_proj"},
                      FamilyRun{"tiny-mistral", "flora", "q_proj,v_proj,gate_proj"}),
    [](const auto& info) {
      std::string name = info.param.preset;
      std::erase(name, '-');
      return name;
    });

// DP-SGD on the clients: each reports the ε its ledger has spent, the coordinator records it per
// round, and a client whose next round would pass its target declines it and leaves.
TEST_F(LlmFixture, DpSgdClientsReportEpsilonAndStopAtTheirTarget) {
  const fs::path data = dir_ / "data", model = dir_ / "model";
  Fedlora({"make-data", "--out", data.string(), "--clients", "3", "--records", "48",
           "--test-records", "12", "--alpha", "0.5", "--seed", "1"});
  Fedlora({"init-model", "--preset", "tiny", "--seed", "2", "--init-std", "0.1", "--out",
           model.string()});
  const double q = 8.0 / 48, sigma = 1.0, delta = 1e-5;
  const double eps1 = common::EpsilonFor(q, sigma, 6, delta)->epsilon;
  const double eps2 = common::EpsilonFor(q, sigma, 12, delta)->epsilon;
  // Client 3 has room for one round, not two: it declines round 2 and leaves (exit 0: a spent
  // budget is not a failure), and the round closes with the other two at once, not at a deadline.
  RunFederation(
      "fedit",
      {"--rounds", "2", "--local-steps", "6", "--learning-rate", "0.01", "--target-modules",
       "q_proj,v_proj"},
      [&](int i) {
        std::vector<std::string> flags = {
            "--workload",
            "llm",
            "--model",
            model.string(),
            "--data",
            (data / ("client-" + std::to_string(i) + ".jsonl")).string(),
            "--batch",
            "8",
            "--eval-examples",
            "8",
            "--dp-noise-multiplier",
            "1",
            "--dp-clip",
            "1"};
        if (i == 3)
          flags.insert(flags.end(), {"--target-epsilon", std::to_string((eps1 + eps2) / 2)});
        return flags;
      });

  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 2u);
  ASSERT_EQ(metrics[0]["dp_epsilon"].size(), 3u) << metrics[0].dump();
  for (const auto& [id, eps] : metrics[0]["dp_epsilon"].items())
    EXPECT_NEAR(eps.get<double>(), eps1, 1e-9 * eps1) << id;
  EXPECT_EQ(metrics[1]["arrived"].size(), 2u);
  EXPECT_EQ(metrics[1]["dropped"].size(), 0u);
  EXPECT_EQ(metrics[1]["attempt"], 1);
  EXPECT_THAT(metrics[1]["declined"]["client-3"].get<std::string>(),
              HasSubstr("privacy budget: round 2 would bring epsilon to"));
  ASSERT_EQ(metrics[1]["dp_epsilon"].size(), 2u) << metrics[1].dump();
  for (const auto& [id, eps] : metrics[1]["dp_epsilon"].items())
    EXPECT_NEAR(eps.get<double>(), eps2, 1e-9 * eps2) << id;
  EXPECT_THAT(testing::ReadText(dir_ / "run-client3.log"),
              HasSubstr("privacy budget: round 2 would bring epsilon to"));
  const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "run-ledger3.json"));
  EXPECT_EQ(ledger["rounds"].size(), 1u);
}

}  // namespace
}  // namespace fedlora
