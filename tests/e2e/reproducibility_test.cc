// Runs reproduce to the bit. The same flags and seeds give byte-identical exports and equal metrics
// lines (timing fields aside) for every method, with the llm and the regression workloads,
// whatever order the updates arrive in and however many threads the clients train on; and a run
// whose coordinator is killed with -9 right after a close, in the middle of an upload or in the
// middle of an evaluation — or whose client is killed while it trains — and restarted ends with
// the bytes of the run that was not interrupted. (The rule that makes it so: README, "Reproducible
// runs".)
#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

class Reproducible : public LlmFixture {
 protected:
  void MakeModelAndData() {
    Fedlora({"make-data", "--out", (dir_ / "data").string(), "--clients", "3", "--records", "32",
             "--test-records", "48", "--alpha", "0.5", "--seed", "1"});
    Fedlora({"init-model", "--preset", "tiny", "--seed", "2", "--init-std", "0.1", "--merges", "60",
             "--tokenizer-corpus", (dir_ / "data" / "client-1.jsonl").string(), "--out",
             (dir_ / "model").string()});
  }
  std::vector<std::string> LlmServer(const std::string& method) const {
    return {"--rounds",
            "2",
            "--base-model-dir",
            (dir_ / "model").string(),
            "--eval-data",
            (dir_ / "data" / "test.jsonl").string(),
            "--eval-accuracy",
            "--eval-max-new-tokens",
            "8",
            "--target-modules",
            "q_proj,v_proj,down_proj",
            "--local-steps",
            "4",
            "--learning-rate",
            method == "fed-sb" ? "0.1" : "0.01"};
  }
  // Clients of the llm workload, on `threads` threads (0: every core).
  ClientFlags LlmClients(int threads) const {
    return [this, threads](int i) {
      return std::vector<std::string>{
          "--workload",      "llm",
          "--model",         (dir_ / "model").string(),
          "--data",          (dir_ / "data" / ("client-" + std::to_string(i) + ".jsonl")).string(),
          "--batch",         "4",
          "--eval-examples", "8",
          "--threads",       std::to_string(threads)};
    };
  }
  // Every file of state/export by its path in there.
  std::map<std::string, std::string> Exported(const std::string& state) const {
    std::map<std::string, std::string> files;
    for (const auto& e : fs::recursive_directory_iterator(dir_ / state / "export"))
      if (e.is_regular_file())
        files[fs::relative(e.path(), dir_ / state / "export").string()] = ReadText(e.path());
    return files;
  }
  // The metrics lines without the fields that time the run.
  std::vector<nlohmann::json> Untimed(const std::string& state) const {
    std::vector<nlohmann::json> lines = Metrics(state);
    for (nlohmann::json& l : lines) {
      l.erase("aggregation_seconds");
      l.erase("elapsed_seconds");
    }
    return lines;
  }
  void ExpectSameRun(const std::string& a, const std::string& b) const {
    const auto exported_a = Exported(a), exported_b = Exported(b);
    ASSERT_FALSE(exported_a.empty());
    EXPECT_EQ(exported_a.size(), exported_b.size());
    for (const auto& [path, bytes] : exported_a) {
      ASSERT_TRUE(exported_b.contains(path)) << path;
      EXPECT_TRUE(bytes == exported_b.at(path)) << path << " differs between " << a << " and " << b;
    }
  }
};

class ReproducibleMethod : public Reproducible,
                           public ::testing::WithParamInterface<std::string> {};

TEST_P(ReproducibleMethod, TwoLlmRunsFromScratchGiveTheSameBytes) {
  MakeModelAndData();
  // The second run's clients train on one thread, the first's on every core.
  RunFederation(GetParam(), LlmServer(GetParam()), LlmClients(0), "a", "a");
  RunFederation(GetParam(), LlmServer(GetParam()), LlmClients(1), "b", "b");
  ExpectSameRun("a", "b");
  const auto lines = Untimed("a");
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_TRUE(lines[1].contains("eval_accuracy")) << lines[1].dump();
  EXPECT_EQ(lines, Untimed("b"));
}

TEST_P(ReproducibleMethod, TwoRegressionRunsFromScratchGiveTheSameBytes) {
  RunFederation(GetParam(), {"--rounds", "3"}, nullptr, "a", "a");
  RunFederation(GetParam(), {"--rounds", "3"}, nullptr, "b", "b");
  ExpectSameRun("a", "b");
  ASSERT_EQ(Untimed("a").size(), 3u);
  EXPECT_EQ(Untimed("a"), Untimed("b"));
}

INSTANTIATE_TEST_SUITE_P(Methods, ReproducibleMethod,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::erase(name, '-');
                           return name;
                         });

// The run as `run`, on a fixed port so that clients find a restarted coordinator; `fault` acts on
// it once the processes are started (and may restart the coordinator).
class Interrupted : public Reproducible {
 protected:
  struct Run {
    std::string name;
    pid_t server = 0;
    std::vector<pid_t> clients;
  };
  void Federation(const std::string& name, const std::function<void(Run&)>& fault,
                  const ClientFlags& extra = nullptr) {
    Run run{name};
    port_ = std::to_string(FreePort());
    run.server = StartServer("fedit", name, Server());
    for (int i = 1; i <= 3; ++i) {
      std::vector<std::string> flags = LlmClients(0)(i);
      if (extra) std::ranges::copy(extra(i), std::back_inserter(flags));
      run.clients.push_back(
          StartClient(i, name, flags, extra ? "fedlora-client-faulty" : "fedlora-client"));
    }
    if (fault) fault(run);
    for (pid_t c : run.clients) EXPECT_EQ(Wait(c, std::chrono::seconds(120)), 0);
    EXPECT_EQ(Wait(run.server, std::chrono::seconds(60)), 0) << ReadText(dir_ / (name + ".log"));
  }
  std::vector<std::string> Server() const {
    std::vector<std::string> flags = LlmServer("fedit");
    flags.insert(flags.end(), {"--listen", "127.0.0.1:" + port_});
    return flags;
  }
  void RestartCoordinator(Run& run) {
    kill(run.server, SIGKILL);
    Wait(run.server, std::chrono::seconds(10));
    run.server = StartServer("fedit", run.name, Server());
    ASSERT_FALSE(port_.empty()) << ReadText(dir_ / (run.name + ".log"));
  }
  // Waits (up to 60 s) for `text` in `log`.
  bool LogHas(const std::string& log, const std::string& text) const {
    for (int t = 0; t < 30000; ++t) {
      if (ReadText(dir_ / log).find(text) != std::string::npos) return true;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    return false;
  }
};

TEST_F(Interrupted, AKillAtAnyStepEndsWithTheBytesOfTheUninterruptedRun) {
  MakeModelAndData();
  Federation("straight", nullptr);

  // Right after round 1's commit: the ledger has version 1 and the coordinator dies.
  Federation("after-close", [&](Run& run) {
    ASSERT_TRUE(LogHas("after-close.log", "round 1 closed"));
    RestartCoordinator(run);
  });
  // In the middle of an evaluation: version 1 committed, its metrics line not yet written.
  Federation("mid-evaluation", [&](Run& run) {
    ASSERT_TRUE(LogHas("mid-evaluation.log", "round 1: evaluating the global model"));
    kill(run.server, SIGKILL);
    Wait(run.server, std::chrono::seconds(10));
    EXPECT_FALSE(fs::exists(dir_ / "mid-evaluation" / "metrics.jsonl"))
        << "the evaluation ended before the kill";
    run.server = StartServer("fedit", run.name, Server());
  });
  // In the middle of an upload: client 2 stops half-way through its first one until the
  // coordinator has been killed and restarted.
  const fs::path pause = dir_ / "paused";
  Federation(
      "mid-upload",
      [&](Run& run) {
        ASSERT_FALSE(WaitForFile(pause, std::chrono::seconds(60)).empty());
        RestartCoordinator(run);
        fs::remove(pause);
      },
      [&](int i) {
        return i == 2 ? std::vector<std::string>{"--chunk-bytes",
                                                 "2048",
                                                 "--testing-pause-mid-upload",
                                                 "0.5",
                                                 "--testing-pause-file",
                                                 pause.string()}
                      : std::vector<std::string>{};
      });
  // A client killed while it trains round 1, and started again.
  Federation("client-killed", [&](Run& run) {
    ASSERT_TRUE(LogHas("client-killed-client3.log", "joined run"));
    ASSERT_TRUE(LogHas("client-killed.log", "round 1: cohort"));
    kill(run.clients[2], SIGKILL);
    Wait(run.clients[2], std::chrono::seconds(10));
    run.clients[2] = StartClient(3, "client-killed", LlmClients(0)(3));
  });

  for (const char* run : {"after-close", "mid-evaluation", "mid-upload", "client-killed"}) {
    SCOPED_TRACE(run);
    ExpectSameRun("straight", run);
  }
  EXPECT_THAT(ReadText(dir_ / "mid-upload.log"), HasSubstr("continuing run"));
  EXPECT_THAT(ReadText(dir_ / "client-killed.log"), HasSubstr("client-3 re-joined"));
}

}  // namespace
}  // namespace fedlora
