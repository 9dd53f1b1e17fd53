// The optimiser against torch.optim.AdamW's formulas, the schedules against Hugging Face's,
// LoRA-SB's initialisation against Eckart–Young, and training against a falling held-out loss.
#include "common/llm/trainer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "tests/test_util.h"

namespace fedlora::common {
namespace {

// Sequences following a fixed rule (next = 3·current + 1 mod 17, from a random start): learnable.
std::vector<Example> RuleData(int n, int len, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<Example> out;
  for (int i = 0; i < n; ++i) {
    Example e;
    int32_t x = static_cast<int32_t>(rng() % 17);
    for (int t = 0; t < len; ++t, x = (3 * x + 1) % 17) e.input_ids.push_back(x);
    e.labels = e.input_ids;
    out.push_back(e);
  }
  return out;
}

// The gradient of the mean loss over `data` (one batch) with respect to each module's frozen
// weight, from the runner's dense weight gradients (checked against finite differences in
// llama_test).
std::vector<MatrixF> DenseGradients(const LlamaWeights& w, const Adapter& layout,
                                    const std::vector<Example>& data) {
  const LlamaConfig& c = w.config();
  auto runner = *LlamaRunner::Create(
      &w, nullptr, {.max_batch = static_cast<int>(data.size()), .max_seq = 10, .training = true});
  std::vector<MatrixF> g;
  for (const LoraModule& m : layout.modules())
    g.push_back(MatrixF::Zero(m.out_features, m.in_features));
  std::vector<float*> dense(c.num_hidden_layers * kNumLinearKinds, nullptr);
  const std::vector<size_t> slots = *AdapterSlots(c, layout);
  for (size_t i = 0; i < slots.size(); ++i) dense[slots[i]] = g[i].data();
  std::vector<size_t> order(data.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  const TokenBatch all = MakeBatch(data, order, 0, data.size(), 0);
  EXPECT_TRUE(runner->WeightGradients(all, 1.0f / all.TargetCount(), dense).ok());
  return g;
}

TEST(ScheduleTest, MatchesHuggingFaceSchedules) {
  // total 10, warmup 2: warmup is step/2; then linear (10 − step)/8, cosine ½(1 + cos(π(step −
  // 2)/8)).
  EXPECT_DOUBLE_EQ(ScheduleFactor(Schedule::kLinear, 0, 10, 2), 0.0);
  EXPECT_DOUBLE_EQ(ScheduleFactor(Schedule::kLinear, 1, 10, 2), 0.5);
  EXPECT_DOUBLE_EQ(ScheduleFactor(Schedule::kLinear, 2, 10, 2), 1.0);
  EXPECT_DOUBLE_EQ(ScheduleFactor(Schedule::kLinear, 6, 10, 2), 0.5);
  EXPECT_NEAR(ScheduleFactor(Schedule::kCosine, 6, 10, 2), 0.5, 1e-15);
  EXPECT_NEAR(ScheduleFactor(Schedule::kCosine, 4, 10, 2), 0.5 * (1 + std::cos(M_PI / 4)), 1e-15);
  EXPECT_DOUBLE_EQ(ScheduleFactor(Schedule::kConstant, 9, 10, 0), 1.0);
}

TEST(TrainerTest, FirstStepIsDecoupledAdamW) {
  const LlamaConfig c = testing::TinyLlama(17);
  const LlamaWeights w = LlamaWeights::Random(c, 1);
  Adapter adapter = *NewAdapter(
      c, {.rank = 2, .alpha = 4, .targets = {LinearKind::kQ, LinearKind::kDown}}, 3, "");
  for (size_t i = 0; i < adapter.num_modules(); ++i)
    adapter.B(i).setConstant(0.05f);  // A gets gradients
  const std::vector<Example> data = RuleData(3, 9, 5);

  // The gradient of the mean loss, computed apart from the trainer.
  auto runner =
      *LlamaRunner::Create(&w, &adapter, {.max_batch = 3, .max_seq = 9, .training = true});
  std::vector<float> g(adapter.values().size(), 0.0f);
  const TokenBatch all = MakeBatch(data, {0, 1, 2}, 0, 3, 0);
  ASSERT_TRUE(runner->ForwardBackward(all, 1.0f / all.TargetCount(), g).ok());

  const std::vector<float> before(adapter.values().begin(), adapter.values().end());
  const double lr = 0.01, wd = 0.1, eps = 1e-8;
  auto result = Train(w, data,
                      {.batch = 3,
                       .steps = 1,
                       .lr = lr,
                       .weight_decay = wd,
                       .schedule = Schedule::kConstant,
                       .max_grad_norm = 0},
                      adapter);
  ASSERT_TRUE(result.ok()) << result.status();
  // Step 1: m̂ = g, v̂ = g², so p ← p·(1 − lr·wd) − lr·g/(|g| + eps).
  for (size_t i = 0; i < before.size(); ++i) {
    const double expected = before[i] * (1 - lr * wd) - lr * g[i] / (std::abs(g[i]) + eps);
    ASSERT_NEAR(adapter.values()[i], expected, 1e-4 * lr) << i;
  }
}

TEST(TrainerTest, TrainingLowersHeldOutLoss) {
  const LlamaConfig c = testing::TinyLlama(17);
  // Initialised wider than transformers' 0.02, so that the frozen head can express a peaked
  // distribution (with 0.02 the logits of a 32-wide model stay within ±0.7).
  const LlamaWeights w = LlamaWeights::Random(c, 2, 0.15f);
  Adapter adapter =
      *NewAdapter(c,
                  {.rank = 8,
                   .alpha = 16,
                   .targets = {LinearKind::kQ, LinearKind::kK, LinearKind::kV, LinearKind::kO,
                               LinearKind::kGate, LinearKind::kUp, LinearKind::kDown}},
                  7, "");
  const std::vector<Example> train = RuleData(64, 16, 1), held_out = RuleData(16, 16, 2);
  const LossSum before = *Evaluate(w, &adapter, held_out, 8, 0);
  std::vector<double> losses;
  auto result = Train(w, train, {.batch = 8, .epochs = 6, .lr = 5e-2, .warmup_ratio = 0.1}, adapter,
                      [&](const StepReport& r) { losses.push_back(r.loss); });
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->steps, 48);  // 64 examples / 8 per step × 6 epochs
  EXPECT_EQ(losses.size(), 48u);
  const LossSum after = *Evaluate(w, &adapter, held_out, 8, 0);
  EXPECT_EQ(before.tokens, 16 * 15);
  // The rule is deterministic after the first token, so the loss can fall far below ln 17.
  EXPECT_LT(after.sum / after.tokens, 0.25 * before.sum / before.tokens)
      << "before " << before.sum / before.tokens << " after " << after.sum / after.tokens;
}

TEST(TrainerTest, LoraSbInitialisationIsTheTruncatedFirstStep) {
  const LlamaConfig c = testing::TinyLlama(17);
  const LlamaWeights w = LlamaWeights::Random(c, 4);
  const int r = 3;
  Adapter adapter = *NewAdapter(
      c, {.rank = r, .alpha = r, .targets = {LinearKind::kV, LinearKind::kGate}, .lora_sb = true},
      0, "");
  const std::vector<Example> data = RuleData(6, 10, 3);
  const double lr = 0.02;
  ASSERT_TRUE(InitLoraSb(w, data, lr, 4, 0, adapter).ok());

  const std::vector<MatrixF> G = DenseGradients(w, adapter, data);

  for (size_t i = 0; i < adapter.num_modules(); ++i) {
    const MatrixD B = adapter.B(i).cast<double>(), A = adapter.A(i).cast<double>(),
                  R = adapter.R(i).cast<double>();
    EXPECT_TRUE((B.transpose() * B).isIdentity(1e-5));
    EXPECT_TRUE((A * A.transpose()).isIdentity(1e-5));
    EXPECT_TRUE(R.isDiagonal(1e-7));
    const MatrixD delta =
        G[i].cast<double>().unaryExpr([&](double g) { return -lr * ((g > 0) - (g < 0)); });
    Eigen::JacobiSVD<MatrixD> svd(delta);
    const Eigen::VectorXd s = svd.singularValues();
    for (int j = 0; j < r; ++j) EXPECT_NEAR(R(j, j), s(j), 1e-5 * s(0));
    // Eckart–Young: the error of the best rank-r approximation is the tail of the spectrum.
    const double tail = std::sqrt(s.tail(s.size() - r).squaredNorm());
    EXPECT_NEAR((B * R * A - delta).norm(), tail, 1e-4 * s(0));
  }
}

TEST(TrainerTest, SketchGradientsAreProductsOfTheDenseGradient) {
  const LlamaConfig c = testing::TinyLlama(17);
  const LlamaWeights w = LlamaWeights::Random(c, 4);
  const Adapter layout = *NewAdapter(
      c, {.rank = 1, .alpha = 1, .targets = {LinearKind::kQ, LinearKind::kDown}, .lora_sb = true},
      0, "");
  const std::vector<Example> data = RuleData(7, 10, 3);
  // G over all 7 records in one batch; the sketches go batch by batch (3 records), never forming G.
  const std::vector<MatrixF> G = DenseGradients(w, layout, data);

  std::mt19937_64 rng(3);
  std::normal_distribution<double> normal;
  for (SketchStep step : {SketchStep::kRange, SketchStep::kTransposed, SketchStep::kPower,
                          SketchStep::kProject, SketchStep::kDense}) {
    std::vector<MatrixD> bases;
    for (const LoraModule& m : layout.modules()) {
      const SketchShape shape = SketchBasisShape(step, static_cast<int>(m.out_features),
                                                 static_cast<int>(m.in_features), 5);
      MatrixD b(shape.rows, shape.cols);
      for (double& v : b.reshaped()) v = normal(rng);
      bases.push_back(b);
    }
    auto products = SketchGradients(w, data, layout, step, bases, 3, 0);
    ASSERT_TRUE(products.ok()) << products.status();
    for (size_t i = 0; i < layout.num_modules(); ++i) {
      const MatrixD expected = SketchProduct(step, G[i].cast<double>(), bases[i]);
      EXPECT_LT(((*products)[i] - expected).norm(), 1e-4 * expected.norm())
          << SketchStepName(step) << " " << layout.module(i).name;
    }
  }
  // A basis of the wrong height is refused, naming the module.
  std::vector<MatrixD> wrong(layout.num_modules(), MatrixD::Zero(2, 5));
  auto refused = SketchGradients(w, data, layout, SketchStep::kRange, wrong, 3, 0);
  EXPECT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find(layout.module(0).name), std::string::npos);
}

// DP-SGD's answer (q = 1): each record's gradient, flat over the modules, clipped to C; the
// clipped products averaged; N(0, (σC)²)/N on every entry. Against per-record dense gradients.
TEST(TrainerTest, PrivateSketchClipsEachRecordAndAddsSigmaCNoise) {
  const LlamaConfig c = testing::TinyLlama(17);
  const LlamaWeights w = LlamaWeights::Random(c, 4);
  const Adapter layout = *NewAdapter(
      c, {.rank = 1, .alpha = 1, .targets = {LinearKind::kQ, LinearKind::kDown}, .lora_sb = true},
      0, "");
  const std::vector<Example> data = RuleData(6, 10, 3);
  std::vector<MatrixD> bases;
  for (size_t i = 0; i < layout.num_modules(); ++i)
    bases.push_back(RangeBasis(5, i, static_cast<int>(layout.module(i).in_features), 4));
  // Per record: its dense gradients (of its own mean token loss) and their flat norm.
  std::vector<std::vector<MatrixF>> g;
  std::vector<double> norms;
  for (const Example& e : data) {
    g.push_back(DenseGradients(w, layout, {e}));
    double sq = 0;
    for (const MatrixF& x : g.back()) sq += x.cast<double>().squaredNorm();
    norms.push_back(std::sqrt(sq));
  }
  std::vector<double> sorted = norms;
  std::sort(sorted.begin(), sorted.end());
  const double clip = sorted[sorted.size() / 2];  // about half the records are clipped
  std::vector<MatrixD> want;
  for (size_t i = 0; i < layout.num_modules(); ++i) {
    MatrixD sum = MatrixD::Zero(layout.module(i).out_features, 4);
    for (size_t e = 0; e < data.size(); ++e)
      sum += std::min(1.0, clip / (norms[e] + 1e-6)) * g[e][i].cast<double>() * bases[i];
    want.push_back(sum / static_cast<double>(data.size()));
  }
  auto clipped = SketchGradients(w, data, layout, SketchStep::kRange, bases, 3, 0,
                                 {.noise_multiplier = 0, .clip = clip});
  ASSERT_TRUE(clipped.ok()) << clipped.status();
  for (size_t i = 0; i < want.size(); ++i)
    EXPECT_LT(((*clipped)[i] - want[i]).norm(), 1e-4 * want[i].norm()) << i;
  // The noise: (noisy − clipped)·N/(σC) is standard normal, entry by entry.
  const double sigma = 1.5;
  auto noisy = SketchGradients(w, data, layout, SketchStep::kRange, bases, 3, 0,
                               {.noise_multiplier = sigma, .clip = clip, .test_seed = 8});
  ASSERT_TRUE(noisy.ok()) << noisy.status();
  double sq = 0, n = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const MatrixD z = ((*noisy)[i] - (*clipped)[i]) * (data.size() / (sigma * clip));
    sq += z.squaredNorm();
    n += static_cast<double>(z.size());
  }
  EXPECT_NEAR(sq / n, 1.0, 5 * std::sqrt(2 / n)) << n;
  // A basis that stretches is refused under DP: it would amplify a record against the noise.
  bases[0] *= 2;
  auto refused = SketchGradients(w, data, layout, SketchStep::kRange, bases, 3, 0,
                                 {.noise_multiplier = sigma, .clip = clip});
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
}

// Two identical runs on two threads agree. With Debian's
// serial OpenBLAS, whose buffer pool has no locks, products made by two threads at once were now
// and then wrong and two runs of `fedlora train` ended 0.4% apart; this test is too small to hit
// that race reliably, so it guards determinism in general.
TEST(TrainerTest, TwoThreadedRunsAgree) {
  const LlamaConfig c = testing::TinyLlama(17);
  const LlamaWeights w = LlamaWeights::Random(c, 5, 0.15f);
  const std::vector<Example> train = RuleData(96, 24, 4);
  std::vector<std::vector<float>> results;
  for (int run = 0; run < 2; ++run) {
    Adapter adapter = *NewAdapter(
        c, {.rank = 4, .alpha = 8, .targets = {LinearKind::kQ, LinearKind::kV, LinearKind::kDown}},
        1, "");
    ASSERT_TRUE(Train(w, train, {.batch = 8, .epochs = 3, .lr = 1e-2, .threads = 2}, adapter).ok());
    results.emplace_back(adapter.values().begin(), adapter.values().end());
  }
  double diff = 0, norm = 0;
  for (size_t i = 0; i < results[0].size(); ++i) {
    diff += std::pow(results[0][i] - results[1][i], 2);
    norm += std::pow(results[0][i], 2);
  }
  // Not bit-exact: products round differently with buffer alignment, and Adam's g/(|g| + ε) turns
  // rounding in near-zero gradients into steps of size lr (seen: 2e-5 relative after 36 steps).
  EXPECT_LE(std::sqrt(diff), 1e-3 * std::sqrt(norm));
}

// DP-SGD against Opacus' formula, computed here from per-example gradients taken apart from the
// trainer: g = (Σ_i min(1, C/(‖g_i‖ + 1e-6))·g_i + N(0, (σC)²)) / (q·n). Adam's first step is
// −lr·g/(|g| + ε), which gives g back; a large ε and lr keep that step well above float rounding.
class DpSgdTest : public ::testing::Test {
 protected:
  void SetUp() override {
    adapter_ = *NewAdapter(
        c_, {.rank = 2, .alpha = 4, .targets = {LinearKind::kV, LinearKind::kUp}}, 3, "");
    for (size_t i = 0; i < adapter_.num_modules(); ++i) adapter_.B(i).setConstant(0.05f);
    start_.assign(adapter_.values().begin(), adapter_.values().end());
  }
  // Σ_i factor_i·g_i over all examples, with factor_i from clip C.
  std::vector<double> ClippedSum(double clip) {
    auto runner =
        *LlamaRunner::Create(&w_, &adapter_, {.max_batch = 1, .max_seq = 9, .training = true});
    std::vector<double> sum(start_.size(), 0.0);
    for (size_t i = 0; i < data_.size(); ++i) {
      std::vector<float> g(start_.size(), 0.0f);
      const TokenBatch b = MakeBatch(data_, {i}, 0, 1, 0);
      EXPECT_TRUE(runner->ForwardBackward(b, 1.0f / b.TargetCount(), g).ok());
      double norm = 0;
      for (float x : g) norm += static_cast<double>(x) * x;
      const double factor = std::min(1.0, clip / (std::sqrt(norm) + 1e-6));
      for (size_t j = 0; j < g.size(); ++j) sum[j] += factor * g[j];
    }
    return sum;
  }
  // The per-coordinate gradient the trainer used in its single step, recovered from the update.
  std::vector<double> StepGradient(const TrainOptions& o) {
    std::vector<double> g(start_.size());
    for (size_t j = 0; j < g.size(); ++j) {
      const double delta = adapter_.values()[j] - start_[j];
      // delta = −lr·g/(|g| + ε)  ⇒  g = −delta·ε/(lr − |delta|)·sign
      g[j] = -delta * o.adam_eps / (o.lr - std::abs(delta));
    }
    return g;
  }
  const LlamaConfig c_ = testing::TinyLlama(17);
  const LlamaWeights w_ = LlamaWeights::Random(c_, 8, 0.15f);
  const std::vector<Example> data_ = RuleData(6, 9, 2);
  Adapter adapter_;
  std::vector<float> start_;
};

TEST_F(DpSgdTest, WithoutNoiseIsTheMeanOfClippedPerExampleGradients) {
  for (double clip : {1e9, 0.05}) {  // no clipping, then every example clipped
    SetUp();
    const std::vector<double> sum = ClippedSum(clip);
    const TrainOptions o{
        .steps = 1,
        .lr = 1.0,
        .adam_eps = 10,
        .schedule = Schedule::kConstant,
        .dp = {.noise_multiplier = 0, .clip = clip, .sample_rate = 1.0, .test_seed = 1}};
    ASSERT_TRUE(Train(w_, data_, o, adapter_).ok());
    const std::vector<double> got = StepGradient(o);
    double diff = 0, norm = 0;
    for (size_t j = 0; j < got.size(); ++j) {
      const double expected = sum[j] / data_.size();  // q·n = 6
      diff += (got[j] - expected) * (got[j] - expected);
      norm += expected * expected;
    }
    EXPECT_GT(norm, 0);
    EXPECT_LE(std::sqrt(diff), 1e-3 * std::sqrt(norm)) << "clip " << clip;
  }
}

TEST_F(DpSgdTest, NoiseHasStddevSigmaCOverTheExpectedBatch) {
  // σ large: the step is noise, N(0, (σC/(q·n))²) per coordinate, around the clipped mean.
  const double sigma = 50, clip = 1, q = 0.5;
  const TrainOptions o{
      .steps = 1,
      .lr = 1e3,
      .adam_eps = 1e6,
      .schedule = Schedule::kConstant,
      .dp = {.noise_multiplier = sigma, .clip = clip, .sample_rate = q, .test_seed = 7}};
  ASSERT_TRUE(Train(w_, data_, o, adapter_).ok());
  const std::vector<double> g = StepGradient(o);
  double mean = 0, var = 0;
  for (double x : g) mean += x / g.size();
  for (double x : g) var += (x - mean) * (x - mean) / (g.size() - 1);
  const double expected = sigma * clip / (q * data_.size());
  // n ≈ 600 coordinates: the sample stddev is within ±12% of σ with overwhelming probability; the
  // clipped gradient (norm ≤ n·C / (q·n) = 2 over all coordinates) is negligible next to it.
  EXPECT_NEAR(std::sqrt(var), expected, 0.12 * expected) << g.size() << " coordinates";
  EXPECT_NEAR(mean, 0, 4 * expected / std::sqrt(static_cast<double>(g.size())));
}

TEST_F(DpSgdTest, SecureNoiseDiffersBetweenRuns) {
  TrainOptions o{
      .steps = 1, .lr = 1e-3, .dp = {.noise_multiplier = 1, .clip = 1, .sample_rate = 1}};
  ASSERT_TRUE(Train(w_, data_, o, adapter_).ok());
  const std::vector<float> first(adapter_.values().begin(), adapter_.values().end());
  SetUp();
  ASSERT_TRUE(Train(w_, data_, o, adapter_).ok());
  EXPECT_NE(first, std::vector<float>(adapter_.values().begin(), adapter_.values().end()));
}

}  // namespace
}  // namespace fedlora::common
