// The subprocess helper against real programs (printf, printenv, pwd, sh, sleep from the system):
// arguments arrive byte for byte, exits and signals are told apart, output lands where it was
// sent, and a child that overstays its timeout is killed.
#include "common/base/subprocess.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>

#include <fstream>
#include <sstream>

#include "tests/scratch_dir.h"

namespace fedlora::common {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string Read(const fs::path& path) {
  std::stringstream s;
  s << std::ifstream(path).rdbuf();
  return s.str();
}

class SubprocessTest : public ::testing::Test {
 protected:
  // Runs argv with stdout (and stderr) to a file; returns what it printed, after checking it
  // exited 0.
  std::string Output(const std::vector<std::string>& argv, SubprocessOptions options = {}) {
    options.stdout_file = dir_ / "out.txt";
    absl::StatusOr<ExitStatus> exit = RunSubprocess(argv, options);
    EXPECT_TRUE(exit.ok()) << exit.status();
    if (exit.ok()) {
      EXPECT_TRUE(exit->ok()) << exit->ToString();
    }
    return Read(dir_ / "out.txt");
  }
  testing::ScratchDir dir_;
};

TEST_F(SubprocessTest, ArgumentsWithSpacesQuotesAndShellCharactersArriveIntact) {
  const std::vector<std::string> args = {"two words", "it's",    "say \"hi\"", "$HOME",
                                         "*",         "a;b|c&d", "`id`",       "back\\slash",
                                         "",          "  pad ",  "line\nbreak"};
  std::vector<std::string> argv = {"printf", "[%s]\\n"};  // found on PATH
  argv.insert(argv.end(), args.begin(), args.end());
  std::string expected;
  for (const std::string& a : args) expected += "[" + a + "]\n";
  EXPECT_EQ(Output(argv), expected);
}

TEST_F(SubprocessTest, ExitCodesAndSignalsAreToldApart) {
  auto run = [](const std::string& script) {
    absl::StatusOr<ExitStatus> exit = RunSubprocess({"/bin/sh", "-c", script});
    EXPECT_TRUE(exit.ok()) << exit.status();
    return exit.value_or(ExitStatus{});
  };
  ExitStatus e = run("exit 0");
  EXPECT_TRUE(e.ok());
  e = run("exit 7");
  EXPECT_FALSE(e.ok());
  EXPECT_EQ(e.code, 7);
  EXPECT_EQ(e.signal, 0);
  EXPECT_EQ(e.ToString(), "exit code 7");
  EXPECT_EQ(e.ShellCode(), 7);
  e = run("kill -KILL $$");
  EXPECT_FALSE(e.ok());
  EXPECT_EQ(e.signal, SIGKILL);
  EXPECT_EQ(e.ShellCode(), 128 + SIGKILL);
  EXPECT_THAT(e.ToString(), HasSubstr("signal 9"));
}

TEST_F(SubprocessTest, StdoutAndStderrGoToTheirFilesOrOneLog) {
  const std::string script = "echo out; echo err >&2";
  SubprocessOptions apart{.stdout_file = dir_ / "o", .stderr_file = dir_ / "e"};
  ASSERT_TRUE(RunSubprocess({"/bin/sh", "-c", script}, apart).ok());
  EXPECT_EQ(Read(dir_ / "o"), "out\n");
  EXPECT_EQ(Read(dir_ / "e"), "err\n");
  // One log for both, truncated by default and appended to on request.
  SubprocessOptions log{.stdout_file = dir_ / "log"};
  ASSERT_TRUE(RunSubprocess({"/bin/sh", "-c", script}, log).ok());
  ASSERT_TRUE(RunSubprocess({"/bin/sh", "-c", script}, log).ok());
  EXPECT_EQ(Read(dir_ / "log"), "out\nerr\n");
  log.append = true;
  ASSERT_TRUE(RunSubprocess({"/bin/sh", "-c", "echo more"}, log).ok());
  EXPECT_EQ(Read(dir_ / "log"), "out\nerr\nmore\n");
}

TEST_F(SubprocessTest, EnvironmentIsAddedOverThisProcesssOwn) {
  ASSERT_EQ(::setenv("FEDLORA_SUBPROCESS_TEST_KEPT", "kept", 1), 0);
  ASSERT_EQ(::setenv("FEDLORA_SUBPROCESS_TEST_REPLACED", "old", 1), 0);
  SubprocessOptions options;
  options.environment = {{"FEDLORA_SUBPROCESS_TEST_NEW", "a 'quoted' \"value\" $x"},
                         {"FEDLORA_SUBPROCESS_TEST_REPLACED", "new"}};
  EXPECT_EQ(Output({"printenv", "FEDLORA_SUBPROCESS_TEST_NEW", "FEDLORA_SUBPROCESS_TEST_REPLACED",
                    "FEDLORA_SUBPROCESS_TEST_KEPT"},
                   options),
            "a 'quoted' \"value\" $x\nnew\nkept\n");
  // Set once: the child's environment has no second FEDLORA_SUBPROCESS_TEST_REPLACED.
  const std::string all = Output({"env"}, options);
  EXPECT_EQ(all.find("FEDLORA_SUBPROCESS_TEST_REPLACED=old"), std::string::npos) << all;
  ::unsetenv("FEDLORA_SUBPROCESS_TEST_KEPT");
  ::unsetenv("FEDLORA_SUBPROCESS_TEST_REPLACED");
}

TEST_F(SubprocessTest, RunsInTheWorkingDirectoryGiven) {
  const fs::path odd = dir_ / "a dir with 'quotes' and spaces";
  fs::create_directories(odd);
  EXPECT_EQ(Output({"pwd", "-P"}, {.working_dir = odd}), fs::canonical(odd).string() + "\n");
}

TEST_F(SubprocessTest, AChildOverItsTimeoutIsKilled) {
  absl::StatusOr<ExitStatus> exit =
      RunSubprocess({"sleep", "60"}, {}, std::chrono::milliseconds(100));
  ASSERT_FALSE(exit.ok());
  EXPECT_EQ(exit.status().code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_THAT(exit.status().message(), HasSubstr("sleep did not end within 0.1 s"));

  absl::StatusOr<Subprocess> child = Subprocess::Start({"sleep", "60"});
  ASSERT_TRUE(child.ok()) << child.status();
  EXPECT_FALSE(child->Poll().has_value());
  EXPECT_FALSE(child->WaitFor(std::chrono::milliseconds(50)).has_value());
  const ExitStatus stopped = child->Stop();
  EXPECT_EQ(stopped.signal, SIGTERM);
  EXPECT_EQ(child->Poll()->signal, SIGTERM);  // remembered once reaped
}

TEST_F(SubprocessTest, ADroppedChildIsKilledAndReaped) {
  pid_t pid = -1;
  {
    absl::StatusOr<Subprocess> child = Subprocess::Start({"sleep", "60"});
    ASSERT_TRUE(child.ok()) << child.status();
    pid = child->pid();
    EXPECT_EQ(::kill(pid, 0), 0);
  }
  EXPECT_EQ(::kill(pid, 0), -1);  // gone, and no zombie left to signal
  EXPECT_EQ(errno, ESRCH);
}

TEST_F(SubprocessTest, AReleasedChildIsWaitedForByPid) {
  absl::StatusOr<Subprocess> child = Subprocess::Start({"/bin/sh", "-c", "exit 3"});
  ASSERT_TRUE(child.ok()) << child.status();
  const pid_t pid = child->Release();
  const std::optional<ExitStatus> exit = WaitForExit(pid, std::chrono::seconds(30));
  ASSERT_TRUE(exit.has_value());
  EXPECT_EQ(exit->code, 3);
}

// A parent that ignores SIGPIPE (gRPC's clients do) would pass that on through exec: the child
// gets every signal's default action instead.
TEST_F(SubprocessTest, TheChildHasDefaultSignalActions) {
  struct sigaction ignore = {}, old = {};
  ignore.sa_handler = SIG_IGN;
  ASSERT_EQ(::sigaction(SIGPIPE, &ignore, &old), 0);
  absl::StatusOr<ExitStatus> exit = RunSubprocess({"/bin/sh", "-c", "kill -PIPE $$; exit 0"});
  ::sigaction(SIGPIPE, &old, nullptr);
  ASSERT_TRUE(exit.ok()) << exit.status();
  EXPECT_EQ(exit->signal, SIGPIPE);
}

TEST_F(SubprocessTest, WhatCannotStartIsAnErrorNamingIt) {
  absl::StatusOr<ExitStatus> exit = RunSubprocess({"fedlora-no-such-program", "x"});
  ASSERT_FALSE(exit.ok());
  EXPECT_EQ(exit.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(exit.status().message(), HasSubstr("cannot run fedlora-no-such-program"));
  exit = RunSubprocess({(dir_ / "missing").string()});
  EXPECT_EQ(exit.status().code(), absl::StatusCode::kNotFound);
  exit = RunSubprocess({"true"}, {.stdout_file = dir_ / "no-such-dir" / "log"});
  ASSERT_FALSE(exit.ok());
  EXPECT_THAT(exit.status().message(), HasSubstr((dir_ / "no-such-dir" / "log").string()));
  exit = RunSubprocess({});
  EXPECT_EQ(exit.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedlora::common
