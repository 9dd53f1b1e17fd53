// Whole federations of real processes, one per method: each round's aggregate is recomputed here,
// with dense products, from the client updates the coordinator stored (named in its metrics), and
// compared with the version it published; client-level DP, DP-SGD, FLoRA's merged bases and a
// site's own trainer (the command workload) likewise.
#include "tests/e2e/federation_fixture.h"

namespace fedlora {
namespace {

using namespace fedlora::testing;  // the fixture

// Runs a whole federation of 3 clients × 3 rounds and checks every round's aggregate against its
// formula.
class EveryMethod : public FederationTest, public ::testing::WithParamInterface<std::string> {};

TEST_P(EveryMethod, AggregatesAreTheFormulaOfWhatClientsUploaded) {
  const std::string method = GetParam();
  RunFederation(method, {});

  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 3u);
  common::Adapter frozen;
  if (method == "fed-sb") {
    const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "state" / "ledger.json"));
    frozen = *common::DecodeAdapter(Blob("state", ledger["versions"][0]["blobs"][0]["sha256"]),
                                    "frozen");
  }
  double first_loss = 0, last_loss = 0;
  for (const auto& m : metrics) {
    ASSERT_EQ(m["arrived"].size(), 3u);
    std::vector<common::Adapter> updates;
    std::vector<double> p;
    double total = 0;
    for (const auto& [id, sha] : m["updates"].items()) {
      const std::string bytes = Blob("state", sha);
      updates.push_back(method == "fed-sb" ? *common::DecodeROnto(bytes, id, frozen)
                                           : *common::DecodeAdapter(bytes, id));
      p.push_back(m["examples"][id].get<double>());
      total += p.back();
      if (method == "fed-sb") {
        // Only R travels: 2 modules × r² f32 values, plus the safetensors header.
        EXPECT_LE(m["bytes_up"][id].get<int64_t>(), 2 * 4 * 4 * 4 + 512);
      }
    }
    for (double& x : p) x /= total;
    const std::string global_bytes = Blob("state", m["global_blob"]);
    const common::Adapter global = method == "fed-sb"
                                       ? *common::DecodeROnto(global_bytes, "global", frozen)
                                       : *common::DecodeAdapter(global_bytes, "global");
    for (size_t i = 0; i < global.num_modules(); ++i) {
      MatrixD ideal = MatrixD::Zero(20, 24), a_bar = MatrixD::Zero(4, 24),
              b_bar = MatrixD::Zero(20, 4);
      for (size_t k = 0; k < updates.size(); ++k) {
        ideal += p[k] * testing::DenseDelta(updates[k], i);
        a_bar += p[k] * updates[k].A(i).cast<double>();
        b_bar += p[k] * updates[k].module(i).scaling * updates[k].B(i).cast<double>();
      }
      const MatrixD got = testing::DenseDelta(global, i);
      if (method == "fedit") {
        EXPECT_LT(testing::RelativeDiff(got, b_bar * a_bar), 1e-5);
      }
      if (method == "flora" || method == "fed-sb") {
        EXPECT_LT(testing::RelativeDiff(got, ideal), 1e-5);
      }
      if (method == "lora-fair") {
        EXPECT_LT(testing::RelativeDiff(global.A(i).cast<double>(), a_bar), 1e-6);  // Ā kept
        auto objective = [&](const MatrixD& b) {
          const MatrixD w = b * a_bar;
          return 1 - (w.array() * ideal.array()).sum() / (w.norm() * ideal.norm()) +
                 0.01 * (b - b_bar).squaredNorm();
        };
        EXPECT_LT(objective(global.B(i).cast<double>()), objective(b_bar));
      }
    }
    (first_loss == 0 ? first_loss : last_loss) = m["mean_loss_before"].get<double>();
  }
  EXPECT_LT(last_loss, first_loss);  // the global model improves on the clients' data
  EXPECT_TRUE(fs::exists(dir_ / "state" / "export" / "global" / "adapter_model.safetensors"));
  if (method == "flora") {
    // The rank-r export is the truncated SVD of the summed deltas: its dense error is the dropped
    // energy.
    const auto global = common::ReadPeftAdapter(dir_ / "state" / "export" / "global");
    const auto cut = common::ReadPeftAdapter(dir_ / "state" / "export" / "global-rank4");
    const auto energy = nlohmann::json::parse(
        testing::ReadText(dir_ / "state" / "export" / "retained_energy.json"));
    ASSERT_TRUE(global.ok() && cut.ok()) << global.status() << cut.status();
    EXPECT_EQ(global->module(0).rank, 3 * 3 * 4);  // 3 rounds × 3 clients × rank 4
    for (size_t i = 0; i < cut->num_modules(); ++i) {
      EXPECT_EQ(cut->module(i).rank, 4);
      const MatrixD full = testing::DenseDelta(*global, i), approx = testing::DenseDelta(*cut, i);
      const double kept = energy["modules"][cut->module(i).name].get<double>();
      EXPECT_GT(kept, 0.0);
      EXPECT_LE(kept, 1.0);
      EXPECT_NEAR((full - approx).squaredNorm(), (1 - kept) * full.squaredNorm(),
                  1e-5 * full.squaredNorm());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, EveryMethod,
                         ::testing::Values("fedit", "flora", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// Client-level DP over the coordinator: each round's published state is recomputed here from the
// stored updates (Δ_k against the previous version, flat clipping, the cohort as divisor), and what
// is left over must be Gaussian noise of stddev z·S/m; ε per round is the accountant's for q = 1.
class ClientLevelDp : public FederationTest, public ::testing::WithParamInterface<std::string> {
 protected:
  // The previous state, the metrics line's updates and its published state.
  struct Round {
    common::Adapter start, global;
    std::vector<common::Adapter> updates;
  };
  std::vector<Round> Rounds(const std::string& method) {
    const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "state" / "ledger.json"));
    const std::string v0 = Blob("state", ledger["versions"][0]["blobs"][0]["sha256"]);
    const common::Adapter zero = *common::DecodeAdapter(v0, "version 0");  // Fed-SB: frozen, R = 0
    auto decode = [&](const std::string& bytes) {
      return method == "fed-sb" ? *common::DecodeROnto(bytes, "blob", zero)
                                : *common::DecodeAdapter(bytes, "blob");
    };
    std::vector<Round> rounds;
    common::Adapter start = zero;
    for (const auto& m : Metrics("state")) {
      Round r{start, decode(Blob("state", m["global_blob"])), {}};
      for (const auto& [id, sha] : m["updates"].items())
        r.updates.push_back(decode(Blob("state", sha)));
      start = r.global;
      rounds.push_back(std::move(r));
    }
    return rounds;
  }
  // Δ of an update against the round's start, flat: (A − A0, s·B − B0) per module, or s·R − R0.
  // With `a_only`, only the A parts (LoRA-FAIR corrects B afterwards).
  static Eigen::VectorXd Delta(const common::Adapter& u, const common::Adapter& start,
                               bool a_only = false) {
    std::vector<double> out;
    auto put = [&](const MatrixD& d) { out.insert(out.end(), d.data(), d.data() + d.size()); };
    for (size_t i = 0; i < u.num_modules(); ++i) {
      const double s = u.module(i).scaling;
      if (u.module(i).has_r) {
        put(s * u.R(i).cast<double>() - start.R(i).cast<double>());
        continue;
      }
      put(u.A(i).cast<double>() - start.A(i).cast<double>());
      if (!a_only) put(s * u.B(i).cast<double>() - start.B(i).cast<double>());
    }
    return Eigen::Map<Eigen::VectorXd>(out.data(), static_cast<Eigen::Index>(out.size()));
  }
};

TEST_P(ClientLevelDp, RoundsAreTheClippedNoisedMeanAndStopAtTheTargetEpsilon) {
  const std::string method = GetParam();
  // Round 1 starts from the same state every time, so its update norms repeat: these clips fall
  // between them (fedit, lora-fair 1.96–2.52; fed-sb 1.127–1.164).
  const double clip = method == "fed-sb" ? 1.15 : 2.2;
  const double z = 0.8, delta = 1e-5, steps = method == "lora-fair" ? 2 : 1;
  auto epsilon = [&](int rounds) {
    return common::EpsilonFor(1.0, z, steps * rounds, delta)->epsilon;
  };
  const double target = (epsilon(2) + epsilon(3)) / 2;  // two of the four rounds fit
  // fed-sb from random B, A: ε here counts rounds only (FedSbInitTest counts the initialisation).
  RunFederation(method, {"--rounds", "4", "--dp-clip", std::to_string(clip),
                         "--dp-noise-multiplier", std::to_string(z), "--dp-target-epsilon",
                         std::to_string(target), "--fed-sb-init", "random"});
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 2u) << testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(testing::ReadText(dir_ / "state.log"), HasSubstr("no more rounds are run"));
  const std::vector<Round> rounds = Rounds(method);
  double sq = 0, n = 0;
  int clipped = 0, unclipped = 0;
  for (size_t t = 0; t < rounds.size(); ++t) {
    const nlohmann::json& dp = metrics[t]["client_dp"];
    EXPECT_NEAR(dp["epsilon"].get<double>(), epsilon(static_cast<int>(t) + 1),
                1e-9 * epsilon(static_cast<int>(t) + 1));
    EXPECT_EQ(dp["sample_rate"].get<double>(), 1.0);
    EXPECT_EQ(dp["clip"].get<double>(), clip);
    const Round& r = rounds[t];
    // Clipping is decided on the whole Δ (A and B); LoRA-FAIR's published B is corrected, so only
    // its A is compared.
    const bool a_only = method == "lora-fair";
    Eigen::VectorXd sum = Eigen::VectorXd::Zero(Delta(r.start, r.start, a_only).size());
    for (const common::Adapter& u : r.updates) {
      const double norm = Delta(u, r.start).norm();
      (norm > clip ? clipped : unclipped)++;
      sum += std::min(1.0, clip / (norm + 1e-6)) * Delta(u, r.start, a_only);
    }
    const Eigen::VectorXd noise = (Delta(r.global, r.start, a_only) - sum / 3) / (z * clip / 3);
    sq += noise.squaredNorm();
    n += static_cast<double>(noise.size());
  }
  EXPECT_GT(clipped, 0);
  EXPECT_GT(unclipped, 0);
  // The standardised leftover has mean square 1 (5-sigma bounds: χ²_n/n ~ N(1, 2/n)).
  EXPECT_LT(std::abs(sq / n - 1), 5 * std::sqrt(2 / n)) << "n = " << n;
  // The operator's summary says what was spent.
  const testing::CommandResult summary =
      testing::RunProgram({kBin + "/fedlora", "summary", (dir_ / "state").string()});
  ASSERT_EQ(summary.exit_code, 0) << summary.output;
  EXPECT_THAT(summary.output,
              HasSubstr(fmt::format("client-level epsilon {:.4f} at delta 1e-05", epsilon(2))));
}

INSTANTIATE_TEST_SUITE_P(Methods, ClientLevelDp, ::testing::Values("fedit", "lora-fair", "fed-sb"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

// Adaptive clipping without noise (z = 0, σ_b = 0) is deterministic: every round is the clipped
// mean at the round's C, and C moves by C·exp(−η(b̄ − γ)) with b̄ the share of updates within C.
TEST_F(ClientLevelDp, AdaptiveClipFollowsTheQuantileOfTheUpdateNorms) {
  const double c0 = 1.0, eta = 0.3, gamma = 0.5;
  RunFederation("fedit",
                {"--dp-clip", std::to_string(c0), "--dp-adaptive-clip", "--dp-clip-learning-rate",
                 std::to_string(eta), "--dp-count-stddev", "0"});
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 3u);
  const std::vector<Round> rounds = Rounds("fedit");
  double clip = c0;
  for (size_t t = 0; t < rounds.size(); ++t) {
    const nlohmann::json& dp = metrics[t]["client_dp"];
    EXPECT_NEAR(dp["clip"].get<double>(), clip, 1e-12 * clip);
    Eigen::VectorXd sum = Eigen::VectorXd::Zero(Delta(rounds[t].start, rounds[t].start).size());
    double within = 0;
    for (const common::Adapter& u : rounds[t].updates) {
      const double norm = Delta(u, rounds[t].start).norm();
      within += norm <= clip;
      sum += std::min(1.0, clip / (norm + 1e-6)) * Delta(u, rounds[t].start);
    }
    EXPECT_LT((Delta(rounds[t].global, rounds[t].start) - sum / 3).norm(), 1e-5 * sum.norm() / 3);
    clip *= std::exp(-eta * (within / 3 - gamma));
    EXPECT_NEAR(dp["next_clip"].get<double>(), clip, 1e-12 * clip);
    EXPECT_TRUE(dp["epsilon"].is_null());  // no noise: ε is infinite, which JSON writes as null
  }
}

// kill -9 of the coordinator mid-run: restarted on its state directory, it goes on counting the
// privacy already spent and carries the adaptive clip over.
TEST_F(ClientLevelDp, ARestartedCoordinatorKeepsCountingAndKeepsItsClip) {
  port_ = std::to_string(FreePort());
  const double z = 0.5;
  const std::vector<std::string> flags = {"--listen",
                                          "127.0.0.1:" + port_,
                                          "--rounds",
                                          "4",
                                          "--local-steps",
                                          "300",
                                          "--dp-clip",
                                          "1",
                                          "--dp-noise-multiplier",
                                          std::to_string(z),
                                          "--dp-adaptive-clip",
                                          "--dp-count-stddev",
                                          "1",
                                          "--fed-sb-init",
                                          "random"};
  pid_t server = StartServer("fed-sb", "state", flags);
  std::vector<pid_t> clients;
  for (int i = 1; i <= 3; ++i) clients.push_back(StartClient(i, "run"));
  for (int t = 0; t < 1000 && Metrics("state").empty(); ++t)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ASSERT_LT(Metrics("state").size(), 4u) << "the run ended before the coordinator could be killed";
  kill(server, SIGKILL);
  testing::Wait(server, std::chrono::seconds(5));
  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  server = StartServer("fed-sb", "state", flags);
  ASSERT_FALSE(port_.empty());
  for (pid_t c : clients) EXPECT_EQ(testing::Wait(c, std::chrono::seconds(90)), 0);
  ASSERT_EQ(testing::Wait(server, std::chrono::seconds(30)), 0)
      << testing::ReadText(dir_ / "state.log");
  EXPECT_THAT(testing::ReadText(dir_ / "state.log"), HasSubstr("continuing run"));
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 4u);
  for (size_t t = 0; t < metrics.size(); ++t) {
    const nlohmann::json& dp = metrics[t]["client_dp"];
    const double want = common::EpsilonFor(1.0, z, static_cast<double>(t + 1), 1e-5)->epsilon;
    EXPECT_NEAR(dp["epsilon"].get<double>(), want, 1e-9 * want) << "round " << t + 1;
    if (t > 0) {
      EXPECT_EQ(dp["clip"], metrics[t - 1]["client_dp"]["next_clip"]) << "round " << t + 1;
    }
  }
}

// The regression workload's DP-SGD over the coordinator: every client reports the accountant's ε
// for q and local steps × rounds, and the global model still improves.
TEST_F(FederationTest, RegressionClientsRunDpSgdAndReportEpsilonEachRound) {
  const double q = 0.2, sigma = 1.0;
  RunFederation("fedit", {}, [](int) {
    return std::vector<std::string>{"--dp-noise-multiplier", "1",  "--dp-clip", "1",
                                    "--dp-sample-rate",      "0.2"};
  });
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 3u);
  for (size_t t = 0; t < metrics.size(); ++t) {
    const double want = common::EpsilonFor(q, sigma, 20.0 * (t + 1), 1e-5)->epsilon;
    ASSERT_EQ(metrics[t]["dp_epsilon"].size(), 3u) << metrics[t].dump();
    for (const auto& [id, eps] : metrics[t]["dp_epsilon"].items())
      EXPECT_NEAR(eps.get<double>(), want, 1e-9 * want) << id << " round " << t + 1;
  }
  EXPECT_LT(metrics.back()["mean_loss_before"].get<double>(),
            metrics.front()["mean_loss_before"].get<double>());
  EXPECT_THAT(testing::ReadText(dir_ / "run-client1.log"), HasSubstr("DP-SGD spent epsilon"));
}

TEST_F(FederationTest, ClientRefusesDpSettingsItCannotHonour) {
  auto client = [&](const std::string& tag, std::vector<std::string> args) {
    args.insert(args.begin(), {kBin + "/fedlora-client", "--insecure"});
    const pid_t pid = Track(testing::Start(args, dir_ / (tag + ".log")));
    EXPECT_EQ(testing::Wait(pid, std::chrono::seconds(10)), 2) << tag;
    return testing::ReadText(dir_ / (tag + ".log"));
  };
  EXPECT_THAT(client("command", {"--workload", "command", "--dp-noise-multiplier", "1"}),
              HasSubstr("a command workload's program must do its own"));
  EXPECT_THAT(client("target", {"--target-epsilon", "3"}),
              HasSubstr("--target-epsilon needs DP-SGD (--dp-noise-multiplier)"));
  EXPECT_THAT(client("clip", {"--dp-noise-multiplier", "1", "--dp-clip", "0"}),
              HasSubstr("--dp-clip must be > 0"));
}

TEST_F(FederationTest, FloraWithClientLevelDpIsRefusedWithTheReason) {
  const std::vector<std::string> argv = {
      kBin + "/fedlora-server", "--method", "flora", "--insecure", "--dp-clip", "1", "--state-dir",
      (dir_ / "state").string()};
  const pid_t pid = Track(testing::Start(argv, dir_ / "flora.log"));
  EXPECT_NE(testing::Wait(pid, std::chrono::seconds(10)), 0);
  EXPECT_THAT(testing::ReadText(dir_ / "flora.log"),
              HasSubstr("the coordinator needs each client's own factors"));
  EXPECT_THAT(testing::ReadText(dir_ / "flora.log"), HasSubstr("DP-SGD"));
}

TEST_F(FederationTest, FloraClientsEndWithTheSameMergedBase) {
  RunFederation("flora", {});
  std::vector<std::vector<float>> bases;
  for (int i = 1; i <= 3; ++i) {
    auto file =
        common::SafetensorsFile::Open(dir_ / ("run-out" + std::to_string(i)) / "base.safetensors");
    ASSERT_TRUE(file.ok()) << file.status();
    std::vector<float> all;
    for (const auto& t : file->view().tensors()) {
      std::vector<float> v(static_cast<size_t>(t.num_elements()));
      file->view().ReadF32(t, v);
      all.insert(all.end(), v.begin(), v.end());
    }
    bases.push_back(std::move(all));
  }
  double max_diff = 0;
  for (size_t j = 0; j < bases[0].size(); ++j) {
    max_diff = std::max({max_diff, std::abs(double(bases[0][j]) - bases[1][j]),
                         std::abs(double(bases[0][j]) - bases[2][j])});
  }
  EXPECT_LT(max_diff, 1e-6);
}

TEST_F(FederationTest, CommandWorkloadRunsTheSitesOwnTrainer) {
  // The site's "trainer" hands back its start adapter: FedIT's next global must then be the initial
  // one. Client i reports a loss before training of i on 10·i examples this round.
  auto trainer = [](int i) {
    return R"(cp "$FEDLORA_START_DIR"/* "$FEDLORA_OUT_DIR"/ && grep -q '"method": "fedit"' )"
           R"("$FEDLORA_TASK_JSON" && echo '{"loss_before": )" +
           std::to_string(i) + R"(, "loss_after": 0.5, "num_examples": )" + std::to_string(10 * i) +
           R"(}' > "$FEDLORA_OUT_DIR/metrics.json")";
  };
  RunFederation("fedit", {"--rounds", "1"}, [&](int i) {
    return std::vector<std::string>{
        "--workload",          "command",
        "--train-command",     trainer(i),
        "--base-model-sha256", std::string(64, 'c'),
        "--modules",           "m.q_proj:24:20,m.v_proj:24:8",
        "--work-dir",          (dir_ / ("work" + std::to_string(i))).string()};
  });
  const auto metrics = Metrics("state");
  ASSERT_EQ(metrics.size(), 1u);
  EXPECT_EQ(metrics[0]["arrived"].size(), 3u);
  EXPECT_DOUBLE_EQ(metrics[0]["mean_train_loss"].get<double>(), 0.5);
  // The counts the program reported are the round's weights: (10·1 + 20·2 + 30·3) / 60.
  EXPECT_EQ(metrics[0]["examples"],
            nlohmann::json({{"client-1", 10}, {"client-2", 20}, {"client-3", 30}}));
  EXPECT_NEAR(metrics[0]["mean_loss_before"].get<double>(), 140.0 / 60.0, 1e-12);
  const auto ledger = nlohmann::json::parse(testing::ReadText(dir_ / "state" / "ledger.json"));
  const auto v0 =
      common::DecodeAdapter(Blob("state", ledger["versions"][0]["blobs"][0]["sha256"]), "v0");
  const auto v1 = common::DecodeAdapter(Blob("state", metrics[0]["global_blob"]), "v1");
  ASSERT_TRUE(v0.ok() && v1.ok());
  ASSERT_EQ(v0->num_modules(), 2u);
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_LT(testing::RelativeDiff(v1->A(i).cast<double>(), v0->A(i).cast<double>()), 1e-6);
    EXPECT_EQ(v1->B(i).norm(), 0.0f);
  }
}

}  // namespace
}  // namespace fedlora
