// The command workload's contract with a site's training program (client/command_workload.h): what
// its metrics.json may say, and the precise refusal of what it must not.
#include "client/workloads/command_workload.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>

#include "common/base/file_util.h"
#include "common/tensor/peft.h"
#include "tests/test_util.h"

namespace fedlora::client {
namespace {

using ::testing::HasSubstr;

class CommandWorkloadTest : public ::testing::Test {
 protected:
  // A "trainer" that hands back its start adapter (or what `adapter` writes), writes `metrics` as
  // its metrics.json, then runs `after`.
  CommandWorkload WithMetrics(const std::string& metrics, const std::string& adapter = "",
                              const std::string& after = "true",
                              const std::string& work_dir = "work") {
    CommandOptions o;
    o.command = (adapter.empty() ? "cp \"$FEDLORA_START_DIR\"/* \"$FEDLORA_OUT_DIR\"/" : adapter) +
                " && echo '" + metrics + "' > \"$FEDLORA_OUT_DIR/metrics.json\" && " + after;
    o.base_model_sha256 = std::string(64, 'c');
    o.modules = *ParseModuleList("m.q_proj:6:5");
    o.examples = 40;
    o.work_dir = dir_ / work_dir;
    return CommandWorkload(o);
  }
  absl::StatusOr<v1::TrainMetrics> Train(CommandWorkload& w) {
    common::Adapter adapter = Start();
    return w.Train(Task(w), adapter);
  }
  v1::Task Task(const CommandWorkload& w) {
    v1::Task task;
    task.set_round(1);
    task.set_method(v1::METHOD_FEDIT);
    task.mutable_settings()->set_rank(2);
    task.mutable_settings()->set_local_steps(3);
    *task.add_modules() = w.modules()[0];
    return task;
  }
  common::Adapter Start() { return testing::RandomAdapter({{"m.q_proj", 2, 6, 5}}, 1); }
  testing::ScratchDir dir_;
};

TEST_F(CommandWorkloadTest, NumExamplesFromMetricsIsTheRoundsWeight) {
  CommandWorkload w = WithMetrics(R"({"loss_before": 2.5, "loss_after": 1.25, "num_examples": 7})");
  EXPECT_EQ(w.num_examples(), 40);  // --examples, until a round says otherwise
  auto m = Train(w);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->loss_before(), 2.5);
  EXPECT_EQ(m->loss_after(), 1.25);
  EXPECT_EQ(w.num_examples(), 7);
}

TEST_F(CommandWorkloadTest, WithoutNumExamplesTheJoinCountStays) {
  CommandWorkload w = WithMetrics(R"({"loss_before": 2.5, "loss_after": 1.25})");
  ASSERT_TRUE(Train(w).ok());
  EXPECT_EQ(w.num_examples(), 40);
}

TEST_F(CommandWorkloadTest, BadMetricsAreRefusedWithWhatTheyHold) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"[1, 2]", "not a JSON object"},
      {R"({"loss_after": 1})", "\"loss_before\" is missing or not a number"},
      {R"({"loss_before": 1, "loss_after": "low"})", "\"loss_after\" is missing or not a number"},
      {R"({"loss_before": 1, "loss_after": 1, "num_examples": 0})",
       "\"num_examples\" is not a positive integer"},
      {R"({"loss_before": 1, "loss_after": 1, "num_examples": 2.5})",
       "\"num_examples\" is not a positive integer"},
  };
  for (const auto& [metrics, why] : cases) {
    CommandWorkload w = WithMetrics(metrics);
    auto m = Train(w);
    ASSERT_FALSE(m.ok()) << metrics;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(m.status().message(), HasSubstr(why));
    EXPECT_THAT(m.status().message(), HasSubstr("it holds: " + metrics));
    EXPECT_EQ(w.num_examples(), 40);  // nothing taken from a refused file
  }
}

// Regression: an adapter with a module the task does not train had it silently dropped.
TEST_F(CommandWorkloadTest, RegressionAnExtraModuleIsRefused) {
  const common::Adapter extra =
      testing::RandomAdapter({{"m.q_proj", 2, 6, 5}, {"m.k_proj", 2, 6, 5}}, 3);
  ASSERT_TRUE(common::WritePeftAdapter(extra, dir_ / "extra").ok());
  CommandWorkload w =
      WithMetrics(R"({"loss_before": 2, "loss_after": 1})",
                  "cp \"" + (dir_ / "extra").string() + "\"/* \"$FEDLORA_OUT_DIR\"/");
  auto m = Train(w);
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(),
              HasSubstr(": module m.k_proj, which the task does not train (1 modules asked)"));
}

// Regression: a training program that links its output to a file of the user's (here a stand-in
// for /etc/shadow) made the client read it, and its first bytes appeared in the error. Links in
// the output are refused, naming the file, and nothing of the target is read or shown.
TEST_F(CommandWorkloadTest, RegressionLinksInTheOutputAreNotFollowed) {
  const auto secret = dir_ / "secret";
  {
    std::ofstream out(secret);
    out << "root:$6$SECRET-HASH:19000:0:99999:7:::\n";
  }
  for (const char* name : {"adapter_model.safetensors", "adapter_config.json", "metrics.json"}) {
    const std::string link = "ln -sf '" + secret.string() + "' \"$FEDLORA_OUT_DIR/" + name + "\"";
    CommandWorkload w = WithMetrics(R"({"loss_before": 2, "loss_after": 1})", "", link);
    auto m = Train(w);
    ASSERT_FALSE(m.ok()) << name;
    EXPECT_THAT(m.status().message(), HasSubstr(std::string(name) + " is a symbolic link"));
    EXPECT_THAT(m.status().message(), ::testing::Not(HasSubstr("SECRET")));
  }
}

// Regression: the paths were spliced into the shell command between single quotes, so a work
// directory with a quote in its name broke the command. They travel in the environment now; the
// command sees them byte for byte.
TEST_F(CommandWorkloadTest, RegressionAWorkDirWithAQuoteAndASpaceWorks) {
  const std::string work = "it's a \"work\" dir $HOME";
  const std::string check =
      "test -f \"$FEDLORA_TASK_JSON\" && grep -q '\"round\": 1' \"$FEDLORA_TASK_JSON\" && "
      "printf '%s\\n%s\\n%s\\n' \"$FEDLORA_START_DIR\" \"$FEDLORA_OUT_DIR\" \"$FEDLORA_TASK_JSON\" "
      "> "
      "\"$FEDLORA_OUT_DIR/../paths.txt\"";
  CommandWorkload w = WithMetrics(R"({"loss_before": 2, "loss_after": 1})", "", check, work);
  common::Adapter adapter = Start();
  auto m = w.Train(Task(w), adapter);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->loss_after(), 1);
  const std::filesystem::path round = dir_ / work / "round-1";
  EXPECT_EQ(common::ReadFileToString(round / "paths.txt").value_or(""),
            (round / "start").string() + "\n" + (round / "out").string() + "\n" +
                (round / "task.json").string() + "\n");
}

TEST_F(CommandWorkloadTest, AFailingCommandSaysHowItEnded) {
  CommandWorkload exits = WithMetrics(R"({"loss_before": 2, "loss_after": 1})", "", "exit 3");
  auto m = Train(exits);
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("the training command failed (exit code 3)"));
  CommandWorkload killed =
      WithMetrics(R"({"loss_before": 2, "loss_after": 1})", "", "kill -KILL $$");
  m = Train(killed);
  ASSERT_FALSE(m.ok());
  EXPECT_THAT(m.status().message(), HasSubstr("the training command failed (signal 9"));
}

}  // namespace
}  // namespace fedlora::client
