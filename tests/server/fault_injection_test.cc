// The round close as a transaction, against every write the coordinator makes. For each method, an
// uninterrupted run gives the reference; then, for every write n of that run (each blob, part,
// ledger, metrics line and export file):
//   transient: only the n-th write fails (EIO) and the same coordinator finishes the run;
//   disk full: the n-th write and every later one fail (ENOSPC) until the coordinator has stalled
//              or given up; then the disk is healed and a coordinator restarted on the same
//              directory finishes the run.
// Either way the ledger holds exactly one version per round, metrics.jsonl one line per round, no
// temporary file is left, and the exported adapter equals the reference to 1e-6. "fedsbsketch" is
// fed-sb initialised from the clients' gradients: a two-step sketch (its basis blob and ledger
// writes) before round 1.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include "common/tensor/peft.h"
#include "tests/server/engine_harness.h"
#include "tests/test_util.h"

namespace fedlora::testing {
namespace {

namespace fs = std::filesystem;

const std::vector<std::string> kClients = {"c1", "c2", "c3"};

// Drives the clients and the clock until the run is done, the engine has given up, or
// `max_steps` rounds of client steps pass. Errors of single calls are what a client would retry.
void Drive(Harness& h, TestEnv& env, int max_steps) {
  for (int step = 0; step < max_steps; ++step) {
    if (h.engine().done() || !h.engine().failed().ok()) return;
    for (const std::string& id : kClients) {
      absl::StatusOr<v1::Task::Kind> kind = h.Step(id);
      if (!kind.ok() && kind.status().message().find("has not joined") != std::string::npos)
        h.Join(id).IgnoreError();
    }
    env.Advance(std::chrono::seconds(1));
    h.Tick();
  }
}

double MaxDiff(const Adapter& x, const Adapter& y) {
  if (x.values().size() != y.values().size()) return INFINITY;
  double d = 0;
  for (size_t i = 0; i < x.values().size(); ++i)
    d = std::max(d, std::abs(static_cast<double>(x.values()[i]) - y.values()[i]));
  return d;
}

std::vector<std::string> Temporaries(const fs::path& dir) {
  std::vector<std::string> found;
  for (const auto& e : fs::recursive_directory_iterator(dir)) {
    if (e.path().filename().string().find(".tmp.") != std::string::npos)
      found.push_back(e.path().string());
  }
  return found;
}

class FaultInjectionTest : public ::testing::TestWithParam<std::string> {
 protected:
  bool sketch() const { return GetParam() == "fed-sb-sketch"; }
  server::ServerOptions Options(const fs::path& state) const {
    server::ServerOptions o = TestOptions(state, sketch() ? "fed-sb" : GetParam());
    if (sketch()) {
      o.fed_sb_init = "sketch";
      o.fed_sb_power_iterations = 0;
    }
    return o;
  }
  // Each client's gradient of each module: Gaussian, fixed by (client, module).
  void Configure(Harness& h) const {
    if (!sketch()) return;
    h.set_gradient([](const std::string& id, size_t i) {
      const auto& [name, n, m] = kModules[i];
      std::mt19937_64 rng(common::Fnv1a(id, i));
      std::normal_distribution<double> normal;
      common::MatrixD g(m, n);
      for (double& v : g.reshaped()) v = normal(rng);
      return g;
    });
  }

  static void SetUpTestSuite() {
    // Scratch state on tmpfs where there is one: these runs test the order of writes, not the
    // disk, and a few thousand fsyncs on a virtual disk would take minutes.
    if (fs::is_directory("/dev/shm") && ::access("/dev/shm", W_OK) == 0)
      ::setenv("TMPDIR", "/dev/shm", 1);
  }

  // An uninterrupted run: its export, and how many writes it made.
  void Reference() {
    ScratchDir dir;
    TestEnv env;
    Harness h(Options(dir / "state"), &env);
    Configure(h);
    ASSERT_TRUE(h.Start().ok());
    for (const std::string& id : kClients) ASSERT_TRUE(h.Join(id).ok());
    Drive(h, env, 20);
    ASSERT_TRUE(h.engine().done());
    writes_ = env.writes();
    auto global = common::ReadPeftAdapter(dir / "state" / "export" / "global");
    ASSERT_TRUE(global.ok()) << global.status();
    reference_ = *std::move(global);
  }

  // Checks a finished run against the reference.
  void Check(const fs::path& state, const std::string& scenario) {
    EXPECT_EQ(LedgerVersions(state), std::vector<int64_t>({0, 1, 2})) << scenario;
    const auto metrics = ReadJsonLines(state / "metrics.jsonl");
    ASSERT_EQ(metrics.size(), 2u) << scenario;
    EXPECT_EQ(metrics[0]["version"], 1) << scenario;
    EXPECT_EQ(metrics[1]["version"], 2) << scenario;
    EXPECT_THAT(Temporaries(state), ::testing::IsEmpty()) << scenario;
    auto global = common::ReadPeftAdapter(state / "export" / "global");
    ASSERT_TRUE(global.ok()) << scenario << ": " << global.status();
    EXPECT_LE(MaxDiff(*global, reference_), 1e-6) << scenario;
  }

  int64_t writes_ = 0;
  Adapter reference_;
};

TEST_P(FaultInjectionTest, EveryFailedWriteLeavesOneVersionPerRoundAndTheSameResult) {
  Reference();
  ASSERT_GT(writes_, 20);
  int64_t failures = 0;
  for (int64_t n = 1; n <= writes_; ++n) {
    for (const bool sticky : {false, true}) {
      const std::string scenario =
          common::StrCat(GetParam(), ": write ", n, " of ", writes_, sticky ? ", disk full" : "");
      ScratchDir dir;
      TestEnv env;
      server::ServerOptions options = Options(dir / "state");
      options.give_up_after_s = 20;
      Harness h(options, &env);
      Configure(h);
      env.FailWrite(n, sticky ? ENOSPC : EIO, sticky);
      // Creating the state directory is the first write: a coordinator that cannot start says so.
      if (absl::Status st = h.Start(); !st.ok()) {
        EXPECT_THAT(st.message(), ::testing::HasSubstr("cannot prepare state directory"));
        env.Heal();
        ASSERT_TRUE(h.Start().ok()) << scenario;
      }
      Drive(h, env, 40);
      const int64_t failed = env.failures();
      if (sticky && !h.engine().done()) {
        env.Heal();
        const absl::Status restarted = h.Start();
        ASSERT_TRUE(restarted.ok()) << scenario << ": " << restarted;
        Drive(h, env, 40);
      }
      failures += failed;
      ASSERT_TRUE(h.engine().done()) << scenario << ": " << h.engine().failed();
      h.Stop();
      Check(dir / "state", scenario);
      if (::testing::Test::HasFailure()) return;
    }
  }
  EXPECT_GE(failures, 2 * writes_) << "every scenario made at least one write fail";
  std::printf("%s: %lld writes, each failed transiently and as a full disk\n", GetParam().c_str(),
              static_cast<long long>(writes_));
}

INSTANTIATE_TEST_SUITE_P(Methods, FaultInjectionTest,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb",
                                           "fed-sb-sketch"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::erase(name, '-');
                           return name;
                         });

}  // namespace
}  // namespace fedlora::testing
