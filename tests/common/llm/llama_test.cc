// The Llama runner against an independent float64 implementation of Hugging Face's
// LlamaForCausalLM written here with plain loops: the loss must agree to 1e-4 relative, and the
// runner's adapter gradients must agree with central finite differences of the float64 loss.
#include "common/llm/llama.h"

#include <gtest/gtest.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <functional>
#include <map>
#include <random>

#include "common/base/file_util.h"
#include "common/base/strings.h"
#include "common/llm/trainer.h"
#include "common/tensor/safetensors.h"
#include "tests/test_util.h"

namespace fedlora::common {
namespace {

using Vec = std::vector<double>;

LlamaConfig TinyConfig(bool tied, int heads, int kv_heads, const std::string& family = "llama") {
  LlamaConfig c;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = heads;
  c.num_key_value_heads = kv_heads;
  c.head_dim = 6;  // deliberately not hidden_size / heads
  c.vocab_size = 37;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 500.0;
  c.tie_word_embeddings = tied;
  // Each family's piece, at sizes where it changes the loss of a 7- or 12-token sequence.
  if (family == "llama3") {
    // Wavelengths 6.3, 50 and 395 at θ 500 and head_dim 6: one in each branch (kept, smoothed,
    // slowed) for an original context of 64.
    c.rope_scaling = {RopeScaling::Type::kLlama3, 8, 1, 4, 64};
  } else if (family == "linear") {
    c.rope_scaling = {RopeScaling::Type::kLinear, 2.5};
    c.bias.fill(true);  // Llama's attention_bias and mlp_bias
  } else if (family == "dynamic") {
    c.rope_scaling = {RopeScaling::Type::kDynamic, 3};
    c.max_position_embeddings = 5;  // shorter than the sequences: the base grows with them
  } else if (family == "mistral") {
    c.model_type = "mistral";
    c.layer_window = {3, 3};
  } else if (family == "qwen2") {
    c.model_type = "qwen2";
    c.bias = {true, true, true, false, false, false, false};
    c.layer_window = {0, 4};
  } else if (family == "qwen3") {
    c.model_type = "qwen3";
    c.qk_norm = true;
    c.head_dim = 8;
    c.layer_window = {2, 0};
  }
  return c;
}

// A model directory with random weights large enough that the loss depends visibly on every
// parameter; norms are not 1, so their weights are exercised.
// Stored in `dtype` (the reference sees the values rounded to it).
std::map<std::string, Vec> WriteModel(const std::filesystem::path& dir, const LlamaConfig& c,
                                      uint64_t seed, DType dtype = DType::kF32) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir / kModelConfigFile) << LlamaConfigJson(c).dump(2);
  const LlamaWeights shapes = LlamaWeights::Random(c, 0);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::map<std::string, Vec> ref;
  std::vector<std::vector<float>> storage;
  std::vector<TensorToWrite> tensors;
  for (const TensorToWrite& t : shapes.Tensors()) {
    const bool norm = t.shape.size() == 1;
    const double sd = norm ? 0.2 : (t.name.find("embed") != std::string::npos ? 1.0 : 0.35);
    Vec v(t.data.size());
    for (double& x : v) x = (norm ? 1.0 : 0.0) + sd * normal(rng);
    std::vector<float> f(v.begin(), v.end());
    if (dtype != DType::kF32) {
      std::vector<uint16_t> rounded(f.size());
      FromF32(f, dtype, rounded.data());
      ToF32(rounded.data(), dtype, f.size(), f.data());
    }
    for (size_t i = 0; i < v.size(); ++i) v[i] = f[i];  // the reference sees the stored values
    ref[t.name] = v;
    storage.push_back(std::move(f));
    tensors.push_back({t.name, t.shape, storage.back()});
  }
  EXPECT_TRUE(WriteSafetensors(dir / kModelWeightsFile, tensors, dtype, {{"format", "pt"}}).ok());
  return ref;
}

Adapter RandomAdapter(const LlamaConfig& c, int rank, bool lora_sb, uint64_t seed) {
  std::vector<ModuleShape> shapes;
  for (int l = 0; l < c.num_hidden_layers; ++l)
    for (int k = 0; k < kNumLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      shapes.push_back({LinearPath(l, kind), rank, LinearIn(c, kind), LinearOut(c, kind),
                        lora_sb ? 1.0 : 1.5, lora_sb});
    }
  Adapter a = *Adapter::Create(shapes);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  for (float& v : a.values()) v = normal(rng);
  return a;
}

TokenBatch RandomBatch(const LlamaConfig& c, int batch, int seq, uint64_t seed) {
  std::mt19937_64 rng(seed);
  TokenBatch b{batch, seq, {}, {}};
  for (int i = 0; i < batch * seq; ++i) {
    b.input_ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
    // Labels are the next inputs as in causal LM training, with some positions masked.
    b.labels.push_back(rng() % 4 == 0 ? -100 : b.input_ids.back());
  }
  return b;
}

// ------------------------------------------------------------------------------------------
// The float64 reference: Hugging Face's modeling_llama, one sequence at a time.

struct Reference {
  LlamaConfig c;
  std::map<std::string, Vec> w;
  const Adapter* adapter = nullptr;  // shapes and scalings
  const Vec* params = nullptr;       // the adapter's values in float64

  // y[T, out] = x[T, in]·Wᵀ (+ s·x·Aᵀ·(Rᵀ)·Bᵀ)
  Vec Linear(int l, LinearKind k, const Vec& x, int T) const {
    const int in = LinearIn(c, k), out = LinearOut(c, k);
    const Vec& W = w.at(LinearPath(l, k) + ".weight");
    Vec y(static_cast<size_t>(T) * out, 0.0);
    for (int t = 0; t < T; ++t)
      for (int o = 0; o < out; ++o) {
        double s = 0;
        for (int i = 0; i < in; ++i) s += W[o * in + i] * x[t * in + i];
        y[t * out + o] = s;
      }
    if (auto bias = w.find(LinearPath(l, k) + ".bias"); bias != w.end())
      for (int t = 0; t < T; ++t)
        for (int o = 0; o < out; ++o) y[t * out + o] += bias->second[o];
    if (adapter == nullptr) return y;
    auto idx = adapter->FindModule(LinearPath(l, k));
    if (!idx) return y;
    const LoraModule& m = adapter->module(*idx);
    const int r = m.rank;
    const double* A = params->data() + m.a_offset;
    const double* B = params->data() + m.b_offset;
    const double* R = params->data() + m.r_offset;
    for (int t = 0; t < T; ++t) {
      Vec u(r, 0.0), v(r, 0.0);
      for (int j = 0; j < r; ++j)
        for (int i = 0; i < in; ++i) u[j] += A[j * in + i] * x[t * in + i];
      if (m.has_r) {
        for (int j = 0; j < r; ++j)
          for (int i = 0; i < r; ++i) v[j] += R[j * r + i] * u[i];
      } else {
        v = u;
      }
      for (int o = 0; o < out; ++o)
        for (int j = 0; j < r; ++j) y[t * out + o] += m.scaling * B[o * r + j] * v[j];
    }
    return y;
  }

  // Over rows of H (the hidden size, or a head's for the q/k norms).
  Vec RmsNorm(const Vec& x, const Vec& g, int T) const {
    const int H = static_cast<int>(g.size());
    Vec y(x.size());
    for (int t = 0; t < T; ++t) {
      double ss = 0;
      for (int j = 0; j < H; ++j) ss += x[t * H + j] * x[t * H + j];
      const double inv = 1.0 / std::sqrt(ss / H + c.rms_norm_eps);
      for (int j = 0; j < H; ++j) y[t * H + j] = x[t * H + j] * inv * g[j];
    }
    return y;
  }

  // transformers' rope_init_fn of each rope type, for a sequence of T positions.
  double InvFreq(int i, int T) const {
    const int D = c.head_dim;
    const RopeScaling& r = c.rope_scaling;
    double base = c.rope_theta;
    if (r.type == RopeScaling::Type::kDynamic) {
      const double len = std::max(T, c.max_position_embeddings);
      base *= std::pow(r.factor * len / c.max_position_embeddings - (r.factor - 1), D / (D - 2.0));
    }
    const double f = 1.0 / std::pow(base, 2.0 * i / D);
    if (r.type == RopeScaling::Type::kLinear) return f / r.factor;
    if (r.type != RopeScaling::Type::kLlama3) return f;
    const double old = r.original_max_position_embeddings, wavelen = 2 * M_PI / f;
    if (wavelen < old / r.high_freq_factor) return f;
    if (wavelen > old / r.low_freq_factor) return f / r.factor;
    const double smooth =
        (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor);
    return (1 - smooth) * f / r.factor + smooth * f;
  }

  void Rope(Vec& x, int heads, int T) const {
    const int D = c.head_dim;
    for (int t = 0; t < T; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < D / 2; ++i) {
          const double f = t * InvFreq(i, T);
          double& a = x[(t * heads + h) * D + i];
          double& b = x[(t * heads + h) * D + i + D / 2];
          const double a0 = a, b0 = b;
          a = a0 * std::cos(f) - b0 * std::sin(f);
          b = b0 * std::cos(f) + a0 * std::sin(f);
        }
  }

  // Σ cross-entropy over the targets of one sequence.
  double SequenceLoss(const int32_t* ids, const int32_t* labels, int T) const {
    const int H = c.hidden_size, D = c.head_dim, Hq = c.num_attention_heads;
    const int Hkv = c.num_key_value_heads, I = c.intermediate_size, V = c.vocab_size;
    const Vec& E = w.at("model.embed_tokens.weight");
    Vec x(static_cast<size_t>(T) * H);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < H; ++j) x[t * H + j] = E[ids[t] * H + j];
    for (int l = 0; l < c.num_hidden_layers; ++l) {
      const std::string p = "model.layers." + std::to_string(l) + ".";
      Vec h = RmsNorm(x, w.at(p + "input_layernorm.weight"), T);
      Vec q = Linear(l, LinearKind::kQ, h, T), k = Linear(l, LinearKind::kK, h, T);
      Vec v = Linear(l, LinearKind::kV, h, T);
      if (c.qk_norm) {
        q = RmsNorm(q, w.at(p + "self_attn.q_norm.weight"), T * Hq);
        k = RmsNorm(k, w.at(p + "self_attn.k_norm.weight"), T * Hkv);
      }
      Rope(q, Hq, T);
      Rope(k, Hkv, T);
      Vec att(static_cast<size_t>(T) * Hq * D, 0.0);
      for (int hd = 0; hd < Hq; ++hd) {
        const int g = hd / (Hq / Hkv);
        for (int i = 0; i < T; ++i) {
          // Positions i − window < j ≤ i (all j ≤ i without a window).
          const int lo = c.window(l) > 0 ? std::max(0, i - c.window(l) + 1) : 0;
          Vec s(i + 1, -1e300);
          double mx = -1e300;
          for (int j = lo; j <= i; ++j) {
            double d = 0;
            for (int e = 0; e < D; ++e) d += q[(i * Hq + hd) * D + e] * k[(j * Hkv + g) * D + e];
            s[j] = d / std::sqrt(static_cast<double>(D));
            mx = std::max(mx, s[j]);
          }
          double z = 0;
          for (double& sj : s) z += (sj = std::exp(sj - mx));
          for (int j = lo; j <= i; ++j)
            for (int e = 0; e < D; ++e)
              att[(i * Hq + hd) * D + e] += s[j] / z * v[(j * Hkv + g) * D + e];
        }
      }
      Vec o = Linear(l, LinearKind::kO, att, T);
      for (size_t j = 0; j < x.size(); ++j) x[j] += o[j];
      h = RmsNorm(x, w.at(p + "post_attention_layernorm.weight"), T);
      Vec gate = Linear(l, LinearKind::kGate, h, T), up = Linear(l, LinearKind::kUp, h, T);
      Vec act(static_cast<size_t>(T) * I);
      for (size_t j = 0; j < act.size(); ++j) act[j] = gate[j] / (1 + std::exp(-gate[j])) * up[j];
      Vec down = Linear(l, LinearKind::kDown, act, T);
      for (size_t j = 0; j < x.size(); ++j) x[j] += down[j];
    }
    Vec hf = RmsNorm(x, w.at("model.norm.weight"), T);
    const Vec& head = c.tie_word_embeddings ? E : w.at("lm_head.weight");
    double loss = 0;
    for (int t = 0; t + 1 < T; ++t) {
      if (labels[t + 1] == -100) continue;
      Vec logits(V, 0.0);
      double mx = -1e300;
      for (int a = 0; a < V; ++a) {
        for (int j = 0; j < H; ++j) logits[a] += head[a * H + j] * hf[t * H + j];
        mx = std::max(mx, logits[a]);
      }
      double z = 0;
      for (double lg : logits) z += std::exp(lg - mx);
      loss += mx + std::log(z) - logits[labels[t + 1]];
    }
    return loss;
  }

  double Loss(const TokenBatch& b) const {
    double sum = 0;
    for (int i = 0; i < b.batch; ++i)
      sum += SequenceLoss(b.input_ids.data() + i * b.seq, b.labels.data() + i * b.seq, b.seq);
    return sum;
  }
};

struct Case {
  bool tied;
  int heads, kv_heads;
  bool lora_sb;
  const char* family = "llama";
  DType dtype = DType::kF32;  // of the checkpoint, which the runner computes with as stored
};

class LlamaTest : public ::testing::TestWithParam<Case> {};

TEST_P(LlamaTest, LossMatchesFloat64ReferenceWithAndWithoutAdapter) {
  const Case p = GetParam();
  const LlamaConfig c = TinyConfig(p.tied, p.heads, p.kv_heads, p.family);
  fedlora::testing::ScratchDir tmp;
  const auto ref_weights = WriteModel(tmp.path() / "model", c, 11, p.dtype);
  auto weights = LlamaWeights::Read(tmp.path() / "model");
  ASSERT_TRUE(weights.ok()) << weights.status();
  ASSERT_EQ(weights->linear(0, LinearKind::kQ).dtype(), p.dtype);  // not converted on load
  const Adapter adapter = RandomAdapter(c, 3, p.lora_sb, 5);
  const Vec params(adapter.values().begin(), adapter.values().end());
  const TokenBatch batch = RandomBatch(c, 3, 12, 7);
  for (const Adapter* a : {static_cast<const Adapter*>(nullptr), &adapter}) {
    Reference ref{c, ref_weights, a, &params};
    const double expected = ref.Loss(batch);
    auto runner = LlamaRunner::Create(&*weights, a, {.max_batch = 4, .max_seq = 16});
    ASSERT_TRUE(runner.ok()) << runner.status();
    auto got = (*runner)->Forward(batch);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->tokens, batch.TargetCount());
    EXPECT_NEAR(got->sum, expected, 1e-5 * std::abs(expected)) << (a ? "adapter" : "base");
  }
}

// The logits `generate` decodes from, against the float64 reference's cross-entropy: for a prefix
// and any next token y, log Σ exp(logits) − logits[y] is the loss of y after the prefix.
TEST_P(LlamaTest, NextTokenLogitsGiveTheReferencesCrossEntropy) {
  const Case p = GetParam();
  if (std::string(p.family) == "dynamic")
    GTEST_SKIP() << "dynamic rope scaling makes every position depend on the whole sequence's "
                    "length, which differs by the scored token";
  const LlamaConfig c = TinyConfig(p.tied, p.heads, p.kv_heads, p.family);
  fedlora::testing::ScratchDir tmp;
  const auto ref_weights = WriteModel(tmp.path() / "model", c, 13, p.dtype);
  auto weights = LlamaWeights::Read(tmp.path() / "model");
  ASSERT_TRUE(weights.ok()) << weights.status();
  const Adapter adapter = RandomAdapter(c, 3, p.lora_sb, 6);
  const Vec params(adapter.values().begin(), adapter.values().end());
  Reference ref{c, ref_weights, &adapter, &params};
  auto runner = LlamaRunner::Create(&*weights, &adapter, {.max_batch = 1, .max_seq = 16});
  ASSERT_TRUE(runner.ok()) << runner.status();
  for (int length : {1, 2, 9}) {
    const TokenBatch prefix = RandomBatch(c, 1, length, 40 + length);
    auto logits = (*runner)->NextTokenLogits(prefix.input_ids);
    ASSERT_TRUE(logits.ok()) << logits.status();
    ASSERT_EQ(logits->size(), static_cast<size_t>(c.vocab_size));
    double max = *std::max_element(logits->begin(), logits->end()), sum = 0;
    for (float l : *logits) sum += std::exp(l - max);
    const double lse = max + std::log(sum);
    for (int32_t next : {0, 5, c.vocab_size - 1}) {
      TokenBatch batch{1, length + 1, prefix.input_ids, std::vector<int32_t>(length + 1, -100)};
      batch.input_ids.push_back(next);
      batch.labels.back() = next;
      const double expected = ref.Loss(batch);
      EXPECT_NEAR(lse - (*logits)[static_cast<size_t>(next)], expected, 1e-5 * expected)
          << "prefix of " << length << ", next token " << next;
    }
  }
  EXPECT_FALSE((*runner)->NextTokenLogits({}).ok());
}

TEST_P(LlamaTest, AdapterGradientsMatchFiniteDifferences) {
  const Case p = GetParam();
  const LlamaConfig c = TinyConfig(p.tied, p.heads, p.kv_heads, p.family);
  fedlora::testing::ScratchDir tmp;
  const auto ref_weights = WriteModel(tmp.path() / "model", c, 21, p.dtype);
  auto weights = LlamaWeights::Read(tmp.path() / "model");
  ASSERT_TRUE(weights.ok()) << weights.status();
  const Adapter adapter = RandomAdapter(c, 2, p.lora_sb, 9);
  const TokenBatch batch = RandomBatch(c, 2, 7, 3);

  auto runner =
      LlamaRunner::Create(&*weights, &adapter, {.max_batch = 2, .max_seq = 8, .training = true});
  ASSERT_TRUE(runner.ok()) << runner.status();
  std::vector<float> grads(adapter.values().size(), 0.0f);
  ASSERT_TRUE((*runner)->ForwardBackward(batch, 1.0f, grads).ok());
  // Recomputing each layer in the backward pass (activation checkpointing) computes the same
  // activations again, so the same gradients to the bit, in less workspace.
  auto recomputing = LlamaRunner::Create(
      &*weights, &adapter,
      {.max_batch = 2, .max_seq = 8, .training = true, .checkpoint_activations = true});
  ASSERT_TRUE(recomputing.ok()) << recomputing.status();
  std::vector<float> recomputed(grads.size(), 0.0f);
  ASSERT_TRUE((*recomputing)->ForwardBackward(batch, 1.0f, recomputed).ok());
  EXPECT_EQ(recomputed, grads);
  EXPECT_LT((*recomputing)->workspace_bytes(), (*runner)->workspace_bytes());

  Vec params(adapter.values().begin(), adapter.values().end());
  Reference ref{c, ref_weights, &adapter, &params};
  const double h = 1e-5;
  // Per trainable tensor of every module: ‖analytic − numeric‖ ≤ 1e-5·‖numeric‖.
  for (const LoraModule& m : adapter.modules()) {
    std::vector<std::pair<const char*, std::pair<size_t, size_t>>> tensors;
    if (m.has_r) {
      tensors.push_back({"R", {m.r_offset, static_cast<size_t>(m.rank) * m.rank}});
    } else {
      tensors.push_back({"A", {m.a_offset, static_cast<size_t>(m.rank) * m.in_features}});
      tensors.push_back({"B", {m.b_offset, static_cast<size_t>(m.out_features) * m.rank}});
    }
    for (const auto& [name, range] : tensors) {
      double diff = 0, norm = 0;
      for (size_t i = range.first; i < range.first + range.second; ++i) {
        const double saved = params[i];
        params[i] = saved + h;
        const double up = ref.Loss(batch);
        params[i] = saved - h;
        const double down = ref.Loss(batch);
        params[i] = saved;
        const double numeric = (up - down) / (2 * h);
        diff += (grads[i] - numeric) * (grads[i] - numeric);
        norm += numeric * numeric;
      }
      EXPECT_GT(norm, 1e-8) << m.name << " " << name << ": gradient vanished";
      EXPECT_LE(std::sqrt(diff), 1e-5 * std::sqrt(norm)) << m.name << " " << name;
    }
  }
  // Frozen parts of LoRA-SB modules get no gradient.
  if (p.lora_sb) {
    for (const LoraModule& m : adapter.modules())
      for (size_t i = m.a_offset; i < m.r_offset; ++i) ASSERT_EQ(grads[i], 0.0f) << m.name;
  }
}

class WeightGradientTest : public ::testing::TestWithParam<const char*> {};

// Fed-SB's initialisation differentiates the frozen weights; through q/k norms and windows too.
TEST_P(WeightGradientTest, MatchFiniteDifferences) {
  const LlamaConfig c = TinyConfig(false, 4, 2, GetParam());
  fedlora::testing::ScratchDir tmp;
  auto ref_weights = WriteModel(tmp.path() / "model", c, 31);
  const LlamaWeights weights = *LlamaWeights::Read(tmp.path() / "model");
  const Adapter adapter = RandomAdapter(c, 2, false, 4);  // gradients also flow through LoRA
  const TokenBatch batch = RandomBatch(c, 2, 6, 8);
  auto runner =
      *LlamaRunner::Create(&weights, &adapter, {.max_batch = 2, .max_seq = 6, .training = true});
  const Vec params(adapter.values().begin(), adapter.values().end());
  for (auto [layer, kind] : {std::pair{0, LinearKind::kK}, std::pair{1, LinearKind::kQ},
                             std::pair{1, LinearKind::kDown}}) {
    const int out = LinearOut(c, kind), in = LinearIn(c, kind);
    std::vector<float> g(static_cast<size_t>(out) * in, 0.0f);
    std::vector<float*> dense(c.num_hidden_layers * kNumLinearKinds, nullptr);
    dense[LinearSlot(layer, kind)] = g.data();
    ASSERT_TRUE(runner->WeightGradients(batch, 1.0f, dense).ok());
    Reference ref{c, ref_weights, &adapter, &params};
    Vec& W = ref.w[LinearPath(layer, kind) + ".weight"];
    double diff = 0, norm = 0;
    for (size_t i = 0; i < W.size(); i += 5) {
      const double saved = W[i];
      W[i] = saved + 1e-5;
      const double up = ref.Loss(batch);
      W[i] = saved - 1e-5;
      const double down = ref.Loss(batch);
      W[i] = saved;
      const double numeric = (up - down) / 2e-5;
      diff += (g[i] - numeric) * (g[i] - numeric);
      norm += numeric * numeric;
    }
    EXPECT_LE(std::sqrt(diff), 1e-3 * std::sqrt(norm)) << LinearPath(layer, kind);
  }
}

INSTANTIATE_TEST_SUITE_P(Families, WeightGradientTest, ::testing::Values("llama", "qwen3", "qwen2"),
                         [](const auto& info) { return std::string(info.param); });

INSTANTIATE_TEST_SUITE_P(
    Variants, LlamaTest,
    ::testing::Values(Case{false, 4, 2, false},  // GQA, untied
                      Case{true, 4, 2, false},   // GQA, tied
                      Case{true, 3, 3, false},   // multi-head
                      Case{false, 4, 1, true},   // LoRA-SB, one kv head
                      Case{true, 4, 2, true},    // LoRA-SB, tied
                      Case{true, 4, 2, false, "llama3"},
                      Case{false, 4, 2, false, "linear"},  // with biases
                      Case{false, 4, 2, false, "dynamic"}, Case{false, 4, 2, false, "mistral"},
                      Case{true, 4, 2, false, "qwen2"}, Case{true, 4, 2, false, "qwen3"},
                      Case{true, 4, 2, true, "qwen3"}, Case{false, 4, 1, true, "mistral"},
                      // Weights kept in bf16 / f16 as the checkpoint stores them.
                      Case{false, 4, 2, false, "llama", DType::kBF16},
                      Case{true, 4, 2, true, "llama3", DType::kBF16},
                      Case{true, 4, 2, false, "qwen2", DType::kBF16},
                      Case{true, 4, 2, false, "qwen3", DType::kF16}),
    [](const auto& info) {
      const Case& p = info.param;
      return std::string(p.family) + (p.tied ? "Tied" : "Untied") + "Q" + std::to_string(p.heads) +
             "KV" + std::to_string(p.kv_heads) + (p.lora_sb ? "LoraSb" : "Lora") +
             (p.dtype == DType::kF32 ? "" : std::string(DTypeName(p.dtype)));
    });

TEST(LlamaWeightsTest, RefusesBiasesMissingAndMisshapenTensors) {
  const LlamaConfig c = TinyConfig(false, 4, 2);
  fedlora::testing::ScratchDir tmp;
  WriteModel(tmp.path() / "m", c, 1);
  auto rewrite = [&](const std::function<void(std::vector<TensorToWrite>&)>& edit) {
    const LlamaWeights w = *LlamaWeights::Read(tmp.path() / "m");
    std::vector<TensorToWrite> tensors = w.Tensors();
    edit(tensors);
    std::filesystem::create_directories(tmp.path() / "bad");
    std::ofstream(tmp.path() / "bad" / kModelConfigFile) << LlamaConfigJson(c).dump();
    EXPECT_TRUE(
        WriteSafetensors(tmp.path() / "bad" / kModelWeightsFile, tensors, DType::kBF16, {}).ok());
    return LlamaWeights::Read(tmp.path() / "bad");
  };
  std::vector<float> bias(24, 0.0f);
  auto with_bias = rewrite([&](auto& t) {
    t.push_back({"model.layers.0.self_attn.q_proj.bias", {24}, bias});
  });
  EXPECT_NE(with_bias.status().message().find("which has no bias there"), std::string::npos)
      << with_bias.status();
  auto missing = rewrite([](auto& t) { t.pop_back(); });
  EXPECT_NE(missing.status().message().find("and no lm_head.weight [37,16]"), std::string::npos)
      << missing.status();
  auto misshapen = rewrite([](auto& t) { t[0].shape = {16, 37}; });
  EXPECT_NE(
      misshapen.status().message().find(
          "config.json says model.embed_tokens.weight is [37,16], the checkpoint has [16,37]"),
      std::string::npos)
      << misshapen.status();
  // BF16 storage is kept as it is.
  auto bf16 = rewrite([](auto&) {});
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(bf16->dtype(), DType::kBF16);
  EXPECT_EQ(bf16->embed().dtype(), DType::kBF16);
  EXPECT_NEAR(bf16->embed().ToVector()[5],
              LlamaWeights::Read(tmp.path() / "m")->embed().ToVector()[5], 1e-2);
}

// Merging computes W0 + s·B·A in float64 and rounds it once to the type asked for (the
// checkpoint's by default), also into weights held in owned memory (here bf16 from Random).
TEST(LlamaWeightsTest, MergeRoundsTheFloat64SumOnceToTheHeldType) {
  const LlamaConfig c = TinyConfig(false, 4, 2);
  const LlamaWeights base = LlamaWeights::Random(c, 5, 0.3f, DType::kBF16);
  const Adapter adapter = RandomAdapter(c, 2, false, 6);
  for (const std::optional<DType> held : {std::optional<DType>(), std::optional(DType::kF32)}) {
    LlamaWeights merged = base;
    ASSERT_TRUE(merged.Merge(adapter, held).ok());
    for (size_t i = 0; i < adapter.num_modules(); i += 5) {
      const LoraModule& m = adapter.module(i);
      const int layer = std::stoi(m.name.substr(std::string("model.layers.").size()));
      const LinearKind kind = static_cast<LinearKind>(i % kNumLinearKinds);
      ASSERT_EQ(m.name, LinearPath(layer, kind));
      const std::vector<float> w0 = base.linear(layer, kind).ToVector();
      const StoredSpan got = merged.linear(layer, kind);
      ASSERT_EQ(got.dtype(), held.value_or(DType::kBF16));
      const std::vector<float> w = got.ToVector();
      const float* a = adapter.values().data() + m.a_offset;
      const float* b = adapter.values().data() + m.b_offset;
      for (int o = 0; o < m.out_features; ++o)
        for (int n = 0; n < m.in_features; ++n) {
          double sum = 0;
          for (int r = 0; r < m.rank; ++r)
            sum += static_cast<double>(b[o * m.rank + r]) * a[r * m.in_features + n];
          float want = static_cast<float>(w0[o * m.in_features + n] + m.scaling * sum);
          if (!held) want = BFloat16BitsToFloat(FloatToBFloat16Bits(want));
          ASSERT_EQ(w[o * m.in_features + n], want) << m.name << " [" << o << ", " << n << "]";
        }
    }
  }
}

// Tensors are used in place where their offset suits their type. Here a 2-byte bf16 tensor first
// puts every f32 tensor after it at an odd multiple of 2: those are copied, and the model computes
// what the aligned checkpoint does.
TEST(LlamaWeightsTest, MisalignedTensorsAreCopiedNotMisread) {
  const LlamaConfig c = TinyConfig(false, 4, 2);
  fedlora::testing::ScratchDir tmp;
  WriteModel(tmp.path() / "m", c, 3);
  const LlamaWeights aligned = *LlamaWeights::Read(tmp.path() / "m");
  nlohmann::ordered_json header;
  header["model.rotary_emb.inv_freq"] = {
      {"dtype", "BF16"}, {"shape", {1}}, {"data_offsets", {0, 2}}};
  std::string data(2, '\0');
  for (const TensorToWrite& t : aligned.Tensors()) {
    header[t.name] = {{"dtype", "F32"},
                      {"shape", t.shape},
                      {"data_offsets", {data.size(), data.size() + t.data.size_bytes()}}};
    data.append(static_cast<const char*>(t.data.data()), t.data.size_bytes());
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  const uint64_t length = text.size();
  std::filesystem::create_directories(tmp.path() / "odd");
  std::ofstream(tmp.path() / "odd" / kModelConfigFile) << LlamaConfigJson(c).dump();
  std::ofstream(tmp.path() / "odd" / kModelWeightsFile, std::ios::binary)
      << std::string(reinterpret_cast<const char*>(&length), 8) << text << data;
  auto odd = LlamaWeights::Read(tmp.path() / "odd");
  ASSERT_TRUE(odd.ok()) << odd.status();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(odd->linear(0, LinearKind::kQ).data()) % 4, 0u);
  const TokenBatch batch = RandomBatch(c, 2, 9, 4);
  auto loss = [&](const LlamaWeights& w) {
    return (*LlamaRunner::Create(&w, nullptr, {.max_batch = 2, .max_seq = 9}))->Forward(batch)->sum;
  };
  EXPECT_EQ(loss(*odd), loss(aligned));
  EXPECT_EQ(WeightsFingerprint(*odd), WeightsFingerprint(aligned));
}

// Regression (issue 29): a config.json over a 2-layer checkpoint that said 1024 layers of width
// 65536 made Read allocate its ~800 TB buffer (std::bad_alloc) before looking at the checkpoint,
// and one of 1000 layers allocated 200 MB to then say "no tensor". The headers come first now, and
// the error says what config.json says and what the checkpoint has.
TEST(LlamaWeightsTest, ComparesTheCheckpointWithConfigJsonBeforeAllocating) {
  const LlamaConfig c = TinyConfig(true, 4, 2);
  fedlora::testing::ScratchDir tmp;
  WriteModel(tmp.path() / "m", c, 1);
  // Tied, H 16, I 24, 24 query and 12 key/value rows, V 37: embed 37·16, final norm 16, and per
  // layer 2 norms of 16, q and o 24·16, k and v 12·16, 3 MLP 24·16 = 2336 in 9 tensors.
  const int64_t small = 37 * 16 + 16 + 2 * 2336, deep = 37 * 16 + 16 + 1000 * 2336;
  ASSERT_EQ(LlamaWeights::Check(tmp.path() / "m")->parameters, small);
  auto with_config = [&](const LlamaConfig& config) {
    std::ofstream(tmp.path() / "m" / kModelConfigFile) << LlamaConfigJson(config).dump();
    const absl::Status read = LlamaWeights::Read(tmp.path() / "m").status();
    EXPECT_EQ(LlamaWeights::Check(tmp.path() / "m").status(), read);
    return std::string(read.message());
  };
  LlamaConfig wide = c;
  wide.num_hidden_layers = 1024;
  wide.hidden_size = 65536;
  wide.intermediate_size = 1 << 20;
  EXPECT_NE(with_config(wide).find("config.json says model.embed_tokens.weight is [37,65536], "
                                   "the checkpoint has [37,16]"),
            std::string::npos)
      << with_config(wide);
  LlamaConfig many = c;
  many.num_hidden_layers = 1000;
  EXPECT_NE(with_config(many).find(
                StrCat("config.json says 9002 tensors of ", deep, " parameters (", 4 * deep,
                       " bytes as f32), the checkpoint has 20 tensors of ", small,
                       " parameters and no model.layers.2.input_layernorm.weight [16]")),
            std::string::npos)
      << with_config(many);
}

// Regression (issue 29): a size over its cap was refused as "must be a positive integer" (over
// 2^30), or accepted (under it), so that 100000 layers sized a 19.5 GB buffer. The message says
// what came and the cap; "positive integer" is kept for what is not one.
TEST(LlamaConfigTest, RefusesSizesOverTheirCapsSayingTheCap) {
  const nlohmann::json base = LlamaConfigJson(TinyConfig(true, 4, 2));
  auto refused = [&](const char* key, const nlohmann::json& value, const std::string& says) {
    nlohmann::json j = base;
    j[key] = value;
    const absl::Status st = ParseLlamaConfig(j, "c").status();
    EXPECT_NE(st.message().find(says), std::string::npos) << key << ": " << st;
  };
  refused("num_hidden_layers", 100000,
          "c: num_hidden_layers is 100000; fedlora takes at most 1024");
  refused("num_hidden_layers", 1000000, "num_hidden_layers is 1000000; fedlora takes at most 1024");
  refused("hidden_size", 1 << 30, "hidden_size is 1073741824; fedlora takes at most 65536");
  refused("head_dim", 1 << 17, "head_dim is 131072; fedlora takes at most 65536");
  refused("intermediate_size", 1 << 21,
          "intermediate_size is 2097152; fedlora takes at most 1048576");
  refused("num_attention_heads", 2048, "num_attention_heads is 2048; fedlora takes at most 1024");
  refused("num_key_value_heads", 2048, "num_key_value_heads is 2048; fedlora takes at most 1024");
  refused("vocab_size", UINT64_MAX,
          "vocab_size is 18446744073709551615; fedlora takes at most 4194304");
  refused("max_position_embeddings", int64_t{1} << 31,
          "max_position_embeddings is 2147483648; fedlora takes at most 1073741824");
  for (const nlohmann::json& v : {nlohmann::json(0), nlohmann::json(-3), nlohmann::json(INT64_MIN),
                                  nlohmann::json(2.5), nlohmann::json("64")})
    refused("hidden_size", v, "\"hidden_size\" must be a positive integer, got " + v.dump());
  nlohmann::json at_caps = base;
  for (auto [key, cap] : {std::pair{"num_hidden_layers", 1024},
                          {"hidden_size", 65536},
                          {"head_dim", 65536},
                          {"intermediate_size", 1 << 20},
                          {"num_attention_heads", 1024},
                          {"num_key_value_heads", 1024},
                          {"vocab_size", 1 << 22},
                          {"max_position_embeddings", 1 << 30}})
    at_caps[key] = cap;
  EXPECT_TRUE(ParseLlamaConfig(at_caps, "c").ok()) << ParseLlamaConfig(at_caps, "c").status();
}

// Llama 3.2 1B's published count, 1,235,814,400 with tied embeddings, by hand from its config.json.
TEST(ModelSizeTest, IsLlama32OneBsPublishedCount) {
  const int64_t H = 2048, I = 8192, L = 16, q = 32 * 64, kv = 8 * 64, V = 128256;
  const int64_t per_layer = 2 * H + q * H + 2 * kv * H + H * q + 3 * I * H;
  ASSERT_EQ(V * H + L * per_layer + H, 1235814400);
  const absl::StatusOr<ModelSize> size = ModelSizeOf(*LlamaPreset("llama-3.2-1b"));
  ASSERT_TRUE(size.ok()) << size.status();
  EXPECT_EQ(size->parameters, 1235814400);
  EXPECT_EQ(size->f32_bytes, 4 * int64_t{1235814400});
}

// The checkpoints tests/fixtures/make_model_families.py writes (Python, not fedlora), one per
// family: biases, q/k norms, tied and untied heads, explicit head_dim.
TEST(ModelSizeTest, IsTheSumOfTheShapesOfACheckpointsTensors) {
  const std::filesystem::path families =
      std::filesystem::path(FEDLORA_SOURCE_DIR) / "tests/fixtures/families";
  for (const char* family :
       {"llama3", "llama-linear-bias", "llama-dynamic", "mistral", "qwen2", "qwen3"}) {
    const absl::StatusOr<SafetensorsFile> file =
        SafetensorsFile::Open(families / family / kModelWeightsFile);
    ASSERT_TRUE(file.ok()) << file.status();
    int64_t sum = 0;
    for (const TensorInfo& t : file->view().tensors()) {
      int64_t n = 1;
      for (int64_t d : t.shape) n *= d;
      sum += n;
    }
    const absl::StatusOr<LlamaConfig> config = ReadLlamaConfig(families / family);
    ASSERT_TRUE(config.ok()) << config.status();
    EXPECT_EQ(ModelSizeOf(*config)->parameters, sum) << family;
    EXPECT_EQ(LlamaWeights::Check(families / family)->parameters, sum) << family;
  }
}

// Sizes set directly, past any cap, are counted without undefined behaviour: a count or a byte
// size beyond int64 is an error naming the sizes and the term that overflowed.
TEST(ModelSizeTest, RefusesCountsThatOverflowInt64NamingTheSizes) {
  const LlamaConfig llama = *LlamaPreset("llama-3.2-1b");
  auto refused = [](const LlamaConfig& c, const std::string& says) {
    const absl::Status st = ModelSizeOf(c).status();
    EXPECT_NE(st.message().find(says), std::string::npos) << st;
    EXPECT_NE(st.message().find("int64"), std::string::npos) << st;
  };
  LlamaConfig c = llama;  // 2^30 layers of q_proj [2048, 2^30]: 2^71
  c.num_hidden_layers = c.hidden_size = c.intermediate_size = 1 << 30;
  refused(c, "num_hidden_layers 1073741824, hidden_size 1073741824, intermediate_size 1073741824");
  refused(c, "q_proj (1073741824 × [2048, 1073741824]) overflows");
  c = llama;  // two heads of (2^31 - 1)^2 leave under 2^33 of int64; the 33 norms take 2^36
  c.vocab_size = c.hidden_size = INT_MAX;
  c.tie_word_embeddings = false;
  refused(c, "the RMSNorms (33 × [2147483647, 1]) overflows");
  c.tie_word_embeddings = true;  // one fits, its bytes do not
  refused(c, "its bytes as f32");
  c = llama;  // q_dim() = heads · head_dim would overflow int; q and o are 2^62 each
  c.num_attention_heads = c.head_dim = INT_MAX;
  c.num_hidden_layers = c.hidden_size = 1;
  refused(c, "o_proj (1 × [1, 4611686014132420609]) overflows");
  c = llama;
  c.head_dim = -1;
  EXPECT_NE(ModelSizeOf(c).status().message().find("head_dim -1"), std::string::npos);
  // At every cap ParseLlamaConfig has, the count stays under 2^55 (llama_config.h).
  c = llama;
  c.num_hidden_layers = c.num_attention_heads = c.num_key_value_heads = 1024;
  c.hidden_size = c.head_dim = 65536;
  c.intermediate_size = 1 << 20;
  c.vocab_size = 1 << 22;
  c.tie_word_embeddings = false;
  c.bias.fill(true);
  c.qk_norm = true;
  const absl::StatusOr<ModelSize> at_caps = ModelSizeOf(c);
  ASSERT_TRUE(at_caps.ok()) << at_caps.status();
  EXPECT_LT(at_caps->parameters, int64_t{1} << 55);
  EXPECT_EQ(at_caps->f32_bytes, 4 * at_caps->parameters);
}

TEST(LlamaConfigTest, RefusesWhatItDoesNotImplement) {
  nlohmann::json base = LlamaConfigJson(TinyConfig(true, 4, 2));
  ASSERT_TRUE(ParseLlamaConfig(base, "c").ok());
  auto refused = [&](const char* key, nlohmann::json value, const char* needle) {
    nlohmann::json j = base;
    j[key] = value;
    auto st = ParseLlamaConfig(j, "c").status();
    EXPECT_NE(st.message().find(needle), std::string::npos) << key << ": " << st;
  };
  refused("model_type", "gemma2", "Gemma scales the embeddings");
  refused("model_type", "phi3", "fuses q, k and v");
  refused("model_type", "qwen3_moe", "mixture-of-experts");
  refused("model_type", "gpt2", "model_type is \"gpt2\"; fedlora's trainer implements the llama");
  refused("rope_scaling", {{"rope_type", "yarn"}, {"factor", 4}},
          "type \"yarn\" is not implemented");
  refused("rope_scaling", {{"rope_type", "llama3"}, {"factor", 8}},
          "rope_scaling of type llama3 needs \"low_freq_factor\"");
  refused("rope_scaling", {{"type", "linear"}, {"factor", -1}}, "rope_scaling.factor must be");
  refused("attention_bias", "yes", "\"attention_bias\" must be true or false");
  refused("partial_rotary_factor", 0.5, "partial_rotary_factor is 0.5");
  refused("hidden_act", "gelu", "hidden_act is \"gelu\"");
  refused("num_key_value_heads", 3, "multiple of num_key_value_heads");
  refused("eos_token_id", 99, "not in [0, vocab_size=37)");
  nlohmann::json list = base;
  list["eos_token_id"] = {1, 2};
  EXPECT_EQ(ParseLlamaConfig(list, "c")->eos_token_ids, (std::vector<int>{1, 2}));
}

// What each family's config.json means, as transformers' config classes read it.
TEST(LlamaConfigTest, ReadsEachFamilysVariationsAsTransformersDoes) {
  nlohmann::json j = LlamaConfigJson(TinyConfig(true, 4, 2));
  j.erase("head_dim");
  j["model_type"] = "qwen2";  // q/k/v biases, no window unless use_sliding_window
  j["sliding_window"] = 4;
  LlamaConfig c = *ParseLlamaConfig(j, "c");
  EXPECT_EQ(c.bias, (std::array<bool, 7>{true, true, true, false, false, false, false}));
  EXPECT_TRUE(c.layer_window.empty());
  j["use_sliding_window"] = true;
  j["max_window_layers"] = 1;  // layers from 1 on
  EXPECT_EQ(ParseLlamaConfig(j, "c")->layer_window, (std::vector<int>{0, 4}));
  j["layer_types"] = {"sliding_attention", "full_attention"};  // takes precedence
  EXPECT_EQ(ParseLlamaConfig(j, "c")->layer_window, (std::vector<int>{4, 0}));
  j["model_type"] = "qwen3";  // q/k norms, head_dim 128 by default, attention_bias
  j["attention_bias"] = true;
  c = *ParseLlamaConfig(j, "c");
  EXPECT_TRUE(c.qk_norm);
  EXPECT_EQ(c.head_dim, 128);
  EXPECT_EQ(c.bias, (std::array<bool, 7>{true, true, true, true, false, false, false}));
  j = LlamaConfigJson(TinyConfig(false, 4, 2));
  j["model_type"] = "mistral";  // every layer windowed; no biases whatever the config says
  j["sliding_window"] = 3;
  j["attention_bias"] = true;
  c = *ParseLlamaConfig(j, "c");
  EXPECT_EQ(c.layer_window, (std::vector<int>{3, 3}));
  EXPECT_EQ(c.bias, (std::array<bool, 7>{}));
  j["sliding_window"] = nullptr;
  EXPECT_TRUE(ParseLlamaConfig(j, "c")->layer_window.empty());
  j.erase("sliding_window");  // MistralConfig's default
  EXPECT_EQ(ParseLlamaConfig(j, "c")->layer_window, (std::vector<int>{4096, 4096}));
  // transformers 5's rope_parameters carries rope_theta too.
  j["rope_parameters"] = {{"rope_type", "linear"}, {"factor", 2}, {"rope_theta", 1234.5}};
  c = *ParseLlamaConfig(j, "c");
  EXPECT_EQ(c.rope_scaling.type, RopeScaling::Type::kLinear);
  EXPECT_EQ(c.rope_theta, 1234.5);
}

// Llama 3.1's published frequencies: θ 500000, head_dim 128, factor 8, low 1, high 4, original
// context 8192. Frequency i has wavelength 2π·θ^(2i/128); wavelengths under 2048 are kept, over
// 8192 divided by 8, and between them interpolated by s = (8192/wavelength − 1)/3.
TEST(LlamaConfigTest, Llama3RopeScalingMatchesItsDefinition) {
  LlamaConfig c = *LlamaPreset("llama-3.2-1b");
  c.head_dim = 128;
  c.rope_scaling.factor = 8;
  const std::vector<double> f = RopeInverseFrequencies(c, 16);
  ASSERT_EQ(f.size(), 64u);
  int kept = 0, slowed = 0, smoothed = 0;
  for (int i = 0; i < 64; ++i) {
    const double plain = std::pow(500000.0, -i / 64.0), wavelength = 2 * M_PI / plain;
    if (wavelength < 2048) {
      EXPECT_DOUBLE_EQ(f[i], plain) << i;
      ++kept;
    } else if (wavelength > 8192) {
      EXPECT_DOUBLE_EQ(f[i], plain / 8) << i;
      ++slowed;
    } else {
      const double s = (8192 / wavelength - 1) / 3;
      EXPECT_NEAR(f[i], (1 - s) * plain / 8 + s * plain, 1e-15) << i;
      ++smoothed;
    }
  }
  EXPECT_GT(kept, 0);
  EXPECT_GT(slowed, 0);
  EXPECT_GT(smoothed, 0);
  // Dynamic NTK: unchanged within the context; beyond it, base·(f·T/P − (f − 1))^(D/(D−2)).
  c.rope_scaling = {RopeScaling::Type::kDynamic, 2};
  c.max_position_embeddings = 100;
  EXPECT_DOUBLE_EQ(RopeInverseFrequencies(c, 100)[1], std::pow(500000.0, -1 / 64.0));
  EXPECT_NEAR(RopeInverseFrequencies(c, 300)[1],
              std::pow(500000.0 * std::pow(2.0 * 300 / 100 - 1, 128.0 / 126), -1 / 64.0), 1e-15);
}

TEST(LlamaRunnerTest, RefusesAdaptersOfAnotherModelAndBadTokens) {
  const LlamaConfig c = TinyConfig(true, 4, 2);
  const LlamaWeights w = LlamaWeights::Random(c, 3);
  Adapter wrong = *Adapter::Create({{"model.layers.0.self_attn.q_proj", 2, 32, 24, 1.0, false}});
  auto st = LlamaRunner::Create(&w, &wrong, {.max_seq = 16}).status();
  EXPECT_NE(st.message().find("hint: adapter trained on another base model?"), std::string::npos)
      << st;
  Adapter unknown = *Adapter::Create({{"model.layers.9.self_attn.q_proj", 2, 16, 24, 1.0, false}});
  EXPECT_FALSE(LlamaRunner::Create(&w, &unknown, {.max_seq = 16}).ok());
  auto runner = LlamaRunner::Create(&w, nullptr, {.max_batch = 1, .max_seq = 4});
  ASSERT_TRUE(runner.ok());
  TokenBatch bad{1, 4, {1, 2, 99, 3}, {1, 2, 3, 4}};
  EXPECT_NE((*runner)->Forward(bad).status().message().find("outside the vocabulary"),
            std::string::npos);
  TokenBatch too_long{1, 5, {1, 2, 3, 4, 5}, {1, 2, 3, 4, 5}};
  EXPECT_FALSE((*runner)->Forward(too_long).ok());
}

}  // namespace
}  // namespace fedlora::common
