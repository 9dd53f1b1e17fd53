// Every method's output is checked against its formula in ALGORITHMS.md, computed here
// independently with dense double-precision products of the clients' factors (testing::DenseDelta),
// never with the code's own helpers.
#include "common/aggregation/aggregate.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/test_util.h"

namespace fedlora::common {
namespace {

using testing::DenseDelta;
using ::testing::HasSubstr;
using testing::RelativeDiff;

const char* kQ = "model.layers.0.self_attn.q_proj";
const char* kV = "model.layers.0.self_attn.v_proj";

// Three clients with mixed ranks (4, 8, 2) and mixed scalings: alpha/r, rsLoRA alpha/sqrt(r), and
// another alpha.
std::vector<Adapter> MixedClients() {
  const double s0 = 8.0 / 4, s1 = 16.0 / std::sqrt(8.0), s2 = 3.0 / 2;
  return {
      testing::RandomAdapter({{kQ, 4, 24, 20, s0}, {kV, 4, 24, 16, s0}}, 11),
      testing::RandomAdapter({{kV, 8, 24, 16, s1}, {kQ, 8, 24, 20, s1}}, 12),  // other module order
      testing::RandomAdapter({{kQ, 2, 24, 20, s2}, {kV, 2, 24, 16, s2}}, 13)};
}
const std::vector<double> kWeights = {1, 2, 3};  // p = 1/6, 2/6, 3/6

// Σ_k p_k s_k B_k A_k for the named module, from dense products.
MatrixD IdealDelta(const std::vector<Adapter>& clients, const std::vector<double>& p,
                   const std::string& name) {
  MatrixD sum;
  for (size_t k = 0; k < clients.size(); ++k) {
    MatrixD d = p[k] * DenseDelta(clients[k], *clients[k].FindModule(name));
    sum = k == 0 ? d : MatrixD(sum + d);
  }
  return sum;
}

// FedIT's zero-padded averages, written out element by element.
void FedItFactors(const std::vector<Adapter>& clients, const std::vector<double>& p,
                  const std::string& name, MatrixD* a_bar, MatrixD* b_bar) {
  int r_max = 0, n = 0, m = 0;
  for (const Adapter& c : clients) {
    const LoraModule& mod = c.module(*c.FindModule(name));
    r_max = std::max(r_max, mod.rank);
    n = mod.in_features;
    m = mod.out_features;
  }
  *a_bar = MatrixD::Zero(r_max, n);
  *b_bar = MatrixD::Zero(m, r_max);
  for (size_t k = 0; k < clients.size(); ++k) {
    const size_t i = *clients[k].FindModule(name);
    const LoraModule& mod = clients[k].module(i);
    for (int r = 0; r < mod.rank; ++r) {
      for (int j = 0; j < n; ++j) (*a_bar)(r, j) += p[k] * clients[k].A(i)(r, j);
      for (int j = 0; j < m; ++j) (*b_bar)(j, r) += p[k] * mod.scaling * clients[k].B(i)(j, r);
    }
  }
}

std::vector<double> P() { return {1.0 / 6, 2.0 / 6, 3.0 / 6}; }

TEST(AggregateTest, HandDerivedScalarCase) {
  // Two rank-1 clients on a 1×1 layer: A1 = 2, B1 = 3 (s = 1); A2 = 4, B2 = 1 (s = 2), equal
  // weights. ΔW* = ½·3·2 + ½·2·1·4 = 7. FedIT: Ā = 3, B̄ = ½·3 + ½·2 = 2.5, so 7.5 (error 0.5/7).
  // FLoRA: exactly 7.
  std::vector<Adapter> c = {*Adapter::Create({{"m", 1, 1, 1, 1.0, false}}),
                            *Adapter::Create({{"m", 1, 1, 1, 2.0, false}})};
  c[0].A(0)(0, 0) = 2;
  c[0].B(0)(0, 0) = 3;
  c[1].A(0)(0, 0) = 4;
  c[1].B(0)(0, 0) = 1;
  auto fedit = Aggregate(c, {}, {Method::kFedIt});
  ASSERT_TRUE(fedit.ok()) << fedit.status();
  EXPECT_FLOAT_EQ(fedit->adapter.A(0)(0, 0), 3.0f);
  EXPECT_FLOAT_EQ(fedit->adapter.B(0)(0, 0), 2.5f);
  EXPECT_NEAR(fedit->modules[0].relative_error, 0.5 / 7, 1e-7);
  EXPECT_NEAR(fedit->modules[0].target_norm, 7.0, 1e-6);
  auto flora = Aggregate(c, {}, {Method::kFlora});
  ASSERT_TRUE(flora.ok());
  EXPECT_EQ(flora->adapter.module(0).rank, 2);
  EXPECT_NEAR(DenseDelta(flora->adapter, 0)(0, 0), 7.0, 1e-6);
  EXPECT_LT(flora->modules[0].relative_error, 1e-7);
}

TEST(AggregateTest, FedItIsTheZeroPaddedAverageForMixedRanksAndScalings) {
  const auto clients = MixedClients();
  auto out = Aggregate(clients, kWeights, {Method::kFedIt});
  ASSERT_TRUE(out.ok()) << out.status();
  const Adapter& g = out->adapter;
  for (const char* name : {kQ, kV}) {
    MatrixD a_bar, b_bar;
    FedItFactors(clients, P(), name, &a_bar, &b_bar);
    const size_t i = *g.FindModule(name);
    EXPECT_EQ(g.module(i).rank, 8);
    EXPECT_LT(RelativeDiff(g.A(i).cast<double>(), a_bar), 1e-6) << name;
    EXPECT_LT(RelativeDiff(DenseDelta(g, i), b_bar * a_bar), 1e-5) << name;
    // The report's aggregation error is FedIT's real error against the ideal ΔW*.
    const MatrixD ideal = IdealDelta(clients, P(), name);
    EXPECT_NEAR(out->modules[i].relative_error, RelativeDiff(b_bar * a_bar, ideal), 1e-6) << name;
    EXPECT_GT(out->modules[i].relative_error, 0.1);
  }
}

TEST(AggregateTest, FloraStackingIsExactForMixedRanksAndScalings) {
  const auto clients = MixedClients();
  auto out = Aggregate(clients, kWeights, {Method::kFlora});
  ASSERT_TRUE(out.ok()) << out.status();
  const Adapter& g = out->adapter;
  for (const char* name : {kQ, kV}) {
    const size_t i = *g.FindModule(name);
    EXPECT_EQ(g.module(i).rank, 4 + 8 + 2);
    EXPECT_LT(RelativeDiff(DenseDelta(g, i), IdealDelta(clients, P(), name)), 1e-5) << name;
    EXPECT_LT(out->modules[i].relative_error, 1e-6);
    // Rows stacked in client order, A scaled by p_k: the second block is p_2·A_2 of client 1.
    const size_t j = *clients[1].FindModule(name);
    EXPECT_LT(RelativeDiff(g.A(i).middleRows(4, 8).cast<double>(),
                           P()[1] * clients[1].A(j).cast<double>()),
              1e-6);
  }
}

TEST(AggregateTest, UniformWeightsWhenNoneAreGiven) {
  const auto clients = MixedClients();
  auto out = Aggregate(clients, {}, {Method::kFlora});
  ASSERT_TRUE(out.ok());
  const std::vector<double> uniform(3, 1.0 / 3);
  EXPECT_LT(RelativeDiff(DenseDelta(out->adapter, 0), IdealDelta(clients, uniform, kQ)), 1e-5);
}

std::vector<Adapter> FedSbClients(const std::vector<double>& scalings) {
  std::vector<Adapter> c;
  for (size_t k = 0; k < scalings.size(); ++k) {
    c.push_back(testing::RandomAdapter(
        {{kQ, 6, 24, 20, scalings[k], true}, {kV, 6, 24, 16, scalings[k], true}}, 100 + k));
    if (k > 0) {  // B and A are frozen and shared: copy them from client 0.
      for (size_t i = 0; i < 2; ++i) {
        c[k].A(i) = c[0].A(i);
        c[k].B(i) = c[0].B(i);
      }
    }
  }
  return c;
}

TEST(AggregateTest, FedSbAveragesRExactly) {
  const auto clients = FedSbClients({1.0, 0.5, 2.0});
  auto out = Aggregate(clients, kWeights, {Method::kFedSb});
  ASSERT_TRUE(out.ok()) << out.status();
  const Adapter& g = out->adapter;
  for (const char* name : {kQ, kV}) {
    const size_t i = *g.FindModule(name);
    EXPECT_TRUE(g.module(i).has_r);
    EXPECT_EQ(g.module(i).rank, 6);
    EXPECT_EQ(g.A(i), clients[0].A(i));
    EXPECT_EQ(g.B(i), clients[0].B(i));
    EXPECT_LT(RelativeDiff(DenseDelta(g, i), IdealDelta(clients, P(), name)), 1e-5) << name;
    EXPECT_LT(out->modules[i].relative_error, 1e-6);
  }
}

TEST(AggregateTest, FedSbRefusesMixedRanksDifferentFrozenFactorsAndPlainLora) {
  auto clients = FedSbClients({1.0, 1.0});
  clients[1].B(1)(3, 2) += 0.01f;
  auto out = Aggregate(clients, {}, {Method::kFedSb});
  EXPECT_THAT(out.status().message(), HasSubstr("lora_B differs"));
  EXPECT_THAT(out.status().message(), HasSubstr(kV));

  std::vector<Adapter> ranks = {testing::RandomAdapter({{kQ, 4, 8, 8, 1.0, true}}, 1),
                                testing::RandomAdapter({{kQ, 6, 8, 8, 1.0, true}}, 2)};
  EXPECT_THAT(Aggregate(ranks, {}, {Method::kFedSb}).status().message(),
              HasSubstr("fed-sb needs equal ranks"));

  std::vector<Adapter> plain = {testing::RandomAdapter({{kQ, 4, 8, 8}}, 1),
                                testing::RandomAdapter({{kQ, 4, 8, 8}}, 2)};
  EXPECT_THAT(Aggregate(plain, {}, {Method::kFedSb}).status().message(),
              HasSubstr("has no lora_R"));
  EXPECT_THAT(Aggregate(FedSbClients({1.0, 1.0}), {}, {Method::kFlora}).status().message(),
              HasSubstr("use --method fed-sb"));
}

TEST(AggregateTest, LoraFairKeepsABarAndBeatsFedIt) {
  const auto clients = MixedClients();
  auto fedit = Aggregate(clients, kWeights, {Method::kFedIt});
  auto fair = Aggregate(clients, kWeights, {Method::kLoraFair});
  ASSERT_TRUE(fair.ok()) << fair.status();
  for (size_t i = 0; i < 2; ++i) {
    EXPECT_EQ(fair->adapter.A(i), fedit->adapter.A(i));  // Ā kept exactly
    const auto& f = fair->modules[i].lora_fair;
    EXPECT_TRUE(f.converged);
    EXPECT_LT(f.objective, f.fedit_objective - 1e-3);
    // The objective as the test computes it densely, at the written B' and at FedIT's B̄.
    const MatrixD ideal = IdealDelta(clients, P(), fair->modules[i].name);
    const MatrixD a_bar = fedit->adapter.A(i).cast<double>();
    auto dense_objective = [&](const MatrixD& b) {
      const MatrixD w = b * a_bar;
      return 1 - (w.array() * ideal.array()).sum() / (w.norm() * ideal.norm()) +
             0.01 * (b - fedit->adapter.B(i).cast<double>()).squaredNorm();
    };
    EXPECT_NEAR(dense_objective(fair->adapter.B(i).cast<double>()), f.objective, 1e-6);
    EXPECT_NEAR(dense_objective(fedit->adapter.B(i).cast<double>()), f.fedit_objective, 1e-6);
  }
}

struct BadInput {
  const char* what;
  std::vector<Adapter> clients;
  std::vector<double> weights;
  const char* message;
};

TEST(AggregateTest, BadInputsAreRefusedWithAPreciseMessage) {
  auto nan = MixedClients();
  nan[1].B(0)(2, 3) = NAN;
  nan[1].source = "site-b";
  auto inf = MixedClients();
  inf[2].A(1)(0, 0) = INFINITY;
  std::vector<Adapter> missing = {testing::RandomAdapter({{kQ, 4, 8, 8}, {kV, 4, 8, 8}}, 1),
                                  testing::RandomAdapter({{kQ, 4, 8, 8}}, 2)};
  std::vector<Adapter> extra = {testing::RandomAdapter({{kQ, 4, 8, 8}}, 1),
                                testing::RandomAdapter({{kQ, 4, 8, 8}, {kV, 4, 8, 8}}, 2)};
  std::vector<Adapter> shape = {testing::RandomAdapter({{kQ, 4, 8, 8}}, 1),
                                testing::RandomAdapter({{kQ, 4, 9, 8}}, 2)};
  const std::vector<BadInput> cases = {
      {"NaN",
       nan,
       {},
       "client 1 (site-b): module model.layers.0.self_attn.v_proj: lora_B holds a non-finite "
       "value"},
      {"Inf", inf, {}, "lora_A holds a non-finite value (inf)"},
      {"missing module", missing, {}, "client 1 has no module model.layers.0.self_attn.v_proj"},
      {"extra module",
       extra,
       {},
       "client 1 has module model.layers.0.self_attn.v_proj, which client 0 does not"},
      {"layer shape", shape, {}, "adapts a 8x8 layer"},
      {"weights count", MixedClients(), {1, 2}, "2 weights given for 3 adapters"},
      {"negative weight", MixedClients(), {1, -2, 3}, "weight 2 is -2"},
      {"zero weights", MixedClients(), {0, 0, 0}, "sum to 0"},
      {"no clients", {}, {}, "no clients"},
  };
  for (const BadInput& c : cases) {
    for (Method method : {Method::kFedIt, Method::kFlora, Method::kLoraFair}) {
      auto out = Aggregate(c.clients, c.weights, {method});
      ASSERT_FALSE(out.ok()) << c.what;
      EXPECT_TRUE(absl::IsInvalidArgument(out.status()));
      EXPECT_THAT(out.status().message(), HasSubstr(c.message))
          << c.what << " / " << MethodName(method);
    }
  }
  EXPECT_THAT(ParseMethod("fedavg").status().message(),
              HasSubstr("expected fedit, flora, lora-fair or fed-sb"));
  for (Method m : kAllMethods) EXPECT_EQ(*ParseMethod(MethodName(m)), m);
}

// Each way an update can differ from its task is named, module and both sides.
TEST(CheckShapesTest, NamesWhatDiffersFromTheTask) {
  const std::vector<ModuleShape> task = {{kQ, 4, 24, 20, 2.0}, {kV, 4, 24, 16, 2.0}};
  const auto check = [&](const std::vector<testing::ModuleSpec>& specs, double scaling = 2.0) {
    return std::string(
        CheckShapes(testing::RandomAdapter(specs, 1), task, "c1", scaling).message());
  };
  EXPECT_EQ(check({{kQ, 4, 24, 20, 2.0}, {kV, 4, 24, 16, 2.0}}), "");
  EXPECT_EQ(check({{kQ, 4, 24, 20, 2.0}}), std::string("c1: module ") + kV + " is missing");
  EXPECT_EQ(check({{kQ, 4, 24, 20, 2.0}, {kV, 4, 24, 16, 2.0}, {"m.k_proj", 4, 24, 16, 2.0}}),
            "c1: module m.k_proj, which the task does not train (2 modules asked)");
  EXPECT_EQ(check({{kQ, 8, 24, 20, 2.0}, {kV, 4, 24, 16, 2.0}}),
            std::string("module ") + kQ + ": lora_A has shape [8,24], task says [4,24]");
  EXPECT_EQ(check({{kQ, 4, 24, 20, 2.0}, {kV, 4, 24, 18, 2.0}}),
            std::string("module ") + kV + ": lora_B has shape [18,4], task says [16,4]");
  EXPECT_EQ(check({{kQ, 4, 24, 20, 2000.0}, {kV, 4, 24, 16, 2.0}}),
            std::string("module ") + kQ + ": scaling 2000, the task's is 2");
  EXPECT_EQ(check({{kQ, 4, 24, 20, 2000.0}, {kV, 4, 24, 16, 2.0}}, 0), "");  // scaling not checked
  EXPECT_EQ(check({{kQ, 4, 24, 20, 2.0, true}, {kV, 4, 24, 16, 2.0}}),
            std::string("module ") + kQ + ": has a lora_R the task does not train");
}

}  // namespace
}  // namespace fedlora::common
