#include "common/llm/llama.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>
#include <random>
#include <set>

#include "absl/status/status.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/workspace.h"
#include "common/tensor/eigen_types.h"
#include "common/tensor/gemm.h"

namespace fedlora::common {

// ---------------------------------------------------------------------------------------------
// Weights

LlamaWeights::LlamaWeights(const LlamaConfig& c) : config_(c) {
  const int64_t H = c.hidden_size, V = c.vocab_size;
  size_t offset = 0;
  auto add = [&](std::string name, std::vector<int64_t> shape) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    table_.push_back({std::move(name), std::move(shape), offset});
    offset += static_cast<size_t>(n);
    return static_cast<int>(table_.size()) - 1;
  };
  embed_ = add("model.embed_tokens.weight", {V, H});
  for (int l = 0; l < c.num_hidden_layers; ++l) {
    LayerEntries e;
    e.bias.fill(-1);
    const std::string p = StrCat("model.layers.", l, ".");
    e.input_norm = add(p + "input_layernorm.weight", {H});
    for (int k = 0; k < kNumLinearKinds; ++k) {
      const LinearKind kind = static_cast<LinearKind>(k);
      if (kind == LinearKind::kGate) e.post_norm = add(p + "post_attention_layernorm.weight", {H});
      e.linear[k] = add(LinearPath(l, kind) + ".weight", {LinearOut(c, kind), LinearIn(c, kind)});
      if (c.has_bias(kind)) e.bias[k] = add(LinearPath(l, kind) + ".bias", {LinearOut(c, kind)});
    }
    if (c.qk_norm) {
      e.q_norm = add(p + "self_attn.q_norm.weight", {c.head_dim});
      e.k_norm = add(p + "self_attn.k_norm.weight", {c.head_dim});
    }
    layers_.push_back(e);
  }
  final_norm_ = add("model.norm.weight", {H});
  lm_head_ = c.tie_word_embeddings ? embed_ : add("lm_head.weight", {V, H});
  buffer_.assign(offset, 0.0f);
}

std::vector<TensorToWrite> LlamaWeights::Tensors() const {
  std::vector<TensorToWrite> out;
  for (const Entry& e : table_) {
    size_t n = 1;
    for (int64_t d : e.shape) n *= static_cast<size_t>(d);
    out.push_back({e.name, e.shape, std::span<const float>(buffer_.data() + e.offset, n)});
  }
  return out;
}

LlamaWeights LlamaWeights::Random(const LlamaConfig& config, uint64_t seed, float std) {
  LlamaWeights w(config);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, std);
  for (const Entry& e : w.table_) {
    size_t n = 1;
    for (int64_t d : e.shape) n *= static_cast<size_t>(d);
    float* p = w.buffer_.data() + e.offset;
    // Norm weights 1 and biases 0, as transformers initialises them.
    const bool vector = e.shape.size() == 1, bias = e.name.ends_with(".bias");
    for (size_t i = 0; i < n; ++i) p[i] = bias ? 0.0f : vector ? 1.0f : normal(rng);
  }
  return w;
}

absl::StatusOr<std::vector<std::filesystem::path>> WeightFiles(const std::filesystem::path& dir) {
  if (std::filesystem::exists(dir / kModelWeightsFile)) return std::vector{dir / kModelWeightsFile};
  if (!std::filesystem::exists(dir / kModelIndexFile))
    return absl::NotFoundError(
        StrCat("no ", kModelWeightsFile, " or ", kModelIndexFile, " in ", dir.string()));
  std::ifstream in(dir / kModelIndexFile);
  nlohmann::json index = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded() || !index.contains("weight_map") || !index["weight_map"].is_object())
    return absl::InvalidArgumentError(
        StrCat((dir / kModelIndexFile).string(), ": expected a JSON object with \"weight_map\""));
  std::set<std::string> shards;
  for (const auto& [name, file] : index["weight_map"].items()) {
    if (!file.is_string() || file.get<std::string>().find('/') != std::string::npos)
      return absl::InvalidArgumentError(StrCat((dir / kModelIndexFile).string(), ": tensor ", name,
                                               " maps to ", file.dump(),
                                               ", expected a file name in the directory"));
    shards.insert(file.get<std::string>());
  }
  std::vector<std::filesystem::path> files;
  for (const std::string& shard : shards) files.push_back(dir / shard);
  return files;
}

absl::StatusOr<LlamaWeights> LlamaWeights::Read(const std::filesystem::path& dir) {
  ASSIGN_OR_RETURN(LlamaConfig config, ReadLlamaConfig(dir));
  LlamaWeights w(config);

  ASSIGN_OR_RETURN(const std::vector<std::filesystem::path> files, WeightFiles(dir));

  std::map<std::string, const Entry*> expected;
  for (const Entry& e : w.table_) expected[e.name] = &e;
  std::set<std::string> found;
  for (const std::filesystem::path& file : files) {
    ASSIGN_OR_RETURN(SafetensorsFile st, SafetensorsFile::Open(file));
    for (const TensorInfo& t : st.view().tensors()) {
      auto it = expected.find(t.name);
      if (it == expected.end()) {
        if (t.name == "lm_head.weight" && config.tie_word_embeddings) continue;  // tied copy
        if (t.name.ends_with("rotary_emb.inv_freq")) continue;  // recomputed from rope_theta
        return absl::InvalidArgumentError(
            StrCat(file.string(), ": unexpected tensor ", t.name, " ", ShapeString(t.shape),
                   " (not part of a ", config.model_type, " checkpoint with this config.json",
                   t.name.ends_with(".bias") ? ", which has no bias there)" : ")"));
      }
      const Entry& e = *it->second;
      if (t.shape != e.shape)
        return absl::InvalidArgumentError(StrCat(file.string(), ": tensor ", t.name, " has shape ",
                                                 ShapeString(t.shape), ", config.json implies ",
                                                 ShapeString(e.shape)));
      st.view().ReadF32(
          t, std::span<float>(w.buffer_.data() + e.offset, static_cast<size_t>(t.num_elements())));
      found.insert(t.name);
    }
  }
  for (const Entry& e : w.table_)
    if (!found.contains(e.name))
      return absl::InvalidArgumentError(
          StrCat("model in ", dir.string(), " has no tensor ", e.name, " ", ShapeString(e.shape)));
  for (float v : w.buffer_)
    if (!std::isfinite(v))
      return absl::InvalidArgumentError(
          StrCat("model in ", dir.string(), " has NaN or Inf weights"));
  return w;
}

absl::Status LlamaWeights::Merge(const Adapter& adapter) {
  ASSIGN_OR_RETURN(std::vector<size_t> slots, AdapterSlots(config_, adapter));
  std::vector<std::pair<size_t, float*>> targets;  // module, its weight
  for (size_t i = 0; i < slots.size(); ++i)
    targets.push_back(
        {i, at(layers_[slots[i] / kNumLinearKinds].linear[slots[i] % kNumLinearKinds])});
  for (const auto& [i, w] : targets) {
    const LoraModule& m = adapter.module(i);
    MatrixD b = adapter.B(i).cast<double>() * m.scaling;
    if (m.has_r) b = b * adapter.R(i).cast<double>();
    MapF W(w, m.out_features, m.in_features);
    W = (W.cast<double>() + b * adapter.A(i).cast<double>()).cast<float>();
  }
  return absl::OkStatus();
}

absl::Status LlamaWeights::WriteInto(const std::filesystem::path& dir, DType dtype,
                                     Env* env) const {
  nlohmann::json json = LlamaConfigJson(config_);
  json["torch_dtype"] = dtype == DType::kBF16  ? "bfloat16"
                        : dtype == DType::kF16 ? "float16"
                                               : "float32";
  RETURN_IF_ERROR(WriteFileSynced(dir / kModelConfigFile, json.dump(2) + "\n", env));
  const std::vector<TensorToWrite> tensors = Tensors();
  return WriteFileSynced(
      dir / kModelWeightsFile,
      [&](std::FILE* f) {
        return WriteSafetensors(f, tensors, dtype, {{"format", "pt"}});
      },
      env);
}

absl::Status LlamaWeights::WriteModelDirectory(const std::filesystem::path& dir,
                                               const std::filesystem::path& companion_dir,
                                               DType dtype, bool overwrite, Env* env) const {
  return BuildDirectoryAtomically(
      dir, overwrite,
      [&](const std::filesystem::path& out) -> absl::Status {
        RETURN_IF_ERROR(WriteInto(out, dtype, env));
        for (const auto& entry : std::filesystem::directory_iterator(companion_dir)) {
          const std::string name = entry.path().filename().string();
          if (!entry.is_regular_file() || name == kModelConfigFile || name == kModelIndexFile ||
              name.ends_with(".safetensors"))
            continue;
          ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(entry.path()));
          RETURN_IF_ERROR(WriteFileSynced(out / name, bytes, env));
        }
        return absl::OkStatus();
      },
      env);
}

int64_t TokenBatch::TargetCount() const {
  int64_t n = 0;
  for (int b = 0; b < batch; ++b)
    for (int t = 1; t < seq; ++t) n += labels[static_cast<size_t>(b) * seq + t] != -100;
  return n;
}

// ---------------------------------------------------------------------------------------------
// The runner

namespace {

ConstMapF CMap(const float* p, int64_t rows, int64_t cols) { return ConstMapF(p, rows, cols); }
MapF Map(float* p, int64_t rows, int64_t cols) { return MapF(p, rows, cols); }

}  // namespace

class LlamaRunner::Impl {
 public:
  Impl(const LlamaWeights* w, const Adapter* adapter, const Options& o)
      : w_(*w), c_(w->config()), adapter_(adapter), opt_(o), pool_(o.threads) {}

  absl::Status Init();
  // With `sink`, the backward pass hands the wanted linears' rows to it instead of computing the
  // adapter's gradients.
  struct Sink {
    const std::vector<bool>& wanted;  // per l·7 + kind
    const std::function<void(const GradientRows&)>& rows;
  };
  absl::StatusOr<LossSum> Run(const TokenBatch& batch, bool backward, float scale,
                              std::span<float> grads, const Sink* sink = nullptr);
  // The LM head's output for row `n` of the last batch: [vocab_size] logits.
  std::vector<float> LogitsAt(int64_t n) const {
    const int H = c_.hidden_size, V = c_.vocab_size;
    std::vector<float> logits(static_cast<size_t>(V));
    Gemm(false, true, 1, V, H, 1.0f, hf_ + n * H, H, w_.lm_head(), H, 0.0f, logits.data(), V);
    return logits;
  }
  // out ([out, in]) += the rows' weight gradient dyᵀ·x.
  void AddWeightGradient(const GradientRows& g, float* out) {
    MatMulTN(g.dy, g.x, out, g.rows, LinearOut(c_, g.kind), LinearIn(c_, g.kind), 1.0f);
  }

 private:
  // Per-layer saved activations; rows are tokens (n = b·T + t).
  struct Layer {
    float* x = nullptr;     // [N, H] layer input (residual stream)
    float* rms1 = nullptr;  // [N]    1/rms of x
    float* h1 = nullptr;    // [N, H] attention-norm output
    float* q = nullptr;     // [N, Hq·D] after RoPE
    float* k = nullptr;     // [N, Hkv·D] after RoPE
    float* qraw = nullptr;  // [N, Hq·D] q_proj's output, before the q norm (qk_norm only)
    float* kraw = nullptr;  // [N, Hkv·D]
    float* rmsq = nullptr;  // [N·Hq] 1/rms of each head of qraw
    float* rmsk = nullptr;  // [N·Hkv]
    float* v = nullptr;     // [N, Hkv·D]
    float* p = nullptr;     // [B, Hq, T, T] attention probabilities
    float* att = nullptr;   // [N, Hq·D] attention output (before o_proj)
    float* x2 = nullptr;    // [N, H] residual after attention
    float* rms2 = nullptr;  // [N]
    float* h2 = nullptr;    // [N, H] MLP-norm output
    float* gate = nullptr;  // [N, I]
    float* up = nullptr;    // [N, I]
    float* act = nullptr;   // [N, I] silu(gate)·up
  };
  struct Lora {  // per adapted linear
    int module = -1;
    AlignedFloats u;  // [N, r]  x·Aᵀ
    AlignedFloats v;  // [N, r]  u·Rᵀ (LoRA-SB only)
  };

  Lora* lora(int l, LinearKind k) {
    Lora& x = lora_[static_cast<size_t>(l) * kNumLinearKinds + static_cast<int>(k)];
    return x.module >= 0 ? &x : nullptr;
  }

  // fn(begin, end) over blocks of kRowBlock rows of [0, rows).
  template <typename Fn>
  void ForRows(int64_t rows, Fn&& fn) {
    ForBlocks(pool_, rows, kRowBlock, fn);
  }
  // fn(begin, end) over blocks of kElementBlock elements of [0, total).
  template <typename Fn>
  void ForElements(int64_t total, Fn&& fn) {
    ForBlocks(pool_, total, kElementBlock, fn);
  }

  // Y (+)= alpha·X·Wᵀ. X [N, n], W [m, n], Y [N, m]; blocks of kRowBlock rows.
  void MatMulNT(const float* x, const float* wt, float* y, int64_t n_rows, int64_t n, int64_t m,
                float alpha, bool accumulate);
  // Y (+)= X·W. X [N, m], W [m, n], Y [N, n].
  void MatMulNN(const float* x, const float* w, float* y, int64_t n_rows, int64_t m, int64_t n,
                bool accumulate);
  // G += alpha·Xᵀ·Y. X [N, a], Y [N, b], G [a, b]; the larger of a and b in kColumnBlock blocks.
  void MatMulTN(const float* x, const float* y, float* g, int64_t n_rows, int64_t a, int64_t b,
                float alpha);

  void LinearForward(int l, LinearKind k, const float* x, float* y);
  // dx (+)= ∂/∂x, and the adapter's gradients into grads_.
  void LinearBackward(int l, LinearKind k, const float* x, const float* dy, float* dx,
                      bool accumulate);

  // y = x·rms·g over rows of `width` (the hidden size, or a head's for the q/k norms).
  void RmsNormForward(const float* x, const float* g, float* rms, float* y, int64_t rows,
                      int width);
  // dx += ∂/∂x of y = x·rms·g given dy.
  void RmsNormBackward(const float* x, const float* g, const float* rms, const float* dy, float* dx,
                       int64_t rows, int width);
  // The rotary tables for sequences of T_ positions (rebuilt only when dynamic scaling asks).
  void PrepareRope();
  void Rope(float* x, int heads, bool inverse);
  // Causal attention, over the last `window` positions when > 0.
  void AttentionForward(Layer& L, int window);
  void AttentionBackward(Layer& L, int window, const float* datt, float* dq, float* dk, float* dv);
  LossSum Head(const float* hf, const int32_t* labels, bool backward, float scale, float* dhf);

  const LlamaWeights& w_;
  const LlamaConfig& c_;
  const Adapter* adapter_;
  Options opt_;
  ThreadPool pool_;

  // Current batch shape.
  int B_ = 0, T_ = 0;
  int64_t N_ = 0;
  float* grads_ = nullptr;      // adapter gradients, or null
  const Sink* sink_ = nullptr;  // weight gradients' consumer, or null

  AlignedFloats acts_;         // all saved activations, each buffer aligned
  std::vector<Layer> layers_;  // L slots when training, else 1
  float* x_out_ = nullptr;     // [N, H] output of the last layer
  float* rmsf_ = nullptr;      // [N]
  float* hf_ = nullptr;        // [N, H] final-norm output
  // Backward scratch.
  float *dres_ = nullptr, *dh_ = nullptr, *dq_ = nullptr, *dk_ = nullptr, *dv_ = nullptr,
        *datt_ = nullptr, *dgate_ = nullptr, *dup_ = nullptr, *dact_ = nullptr;
  float *dqraw_ = nullptr, *dkraw_ = nullptr;  // qk_norm: gradients at q_proj's, k_proj's output
  AlignedFloats du_, du2_;                     // [N, max r]
  std::vector<Lora> lora_;                     // [L·7]
  std::vector<float> cos_, sin_;               // [max_seq, D/2]
  int rope_key_ = -1;                          // the sequence length the tables were made for
  std::vector<AlignedFloats> scratch_;         // per thread: attention dP, head logits
  std::vector<int64_t> head_rows_;             // rows that carry a target
  std::vector<double> head_loss_;              // loss per head row, summed in row order
  // Rows of logits per work item: each product streams the whole [V, H] head through the cache, so
  // the fewer chunks the better.
  static constexpr int kHeadChunk = 256;
};

absl::Status LlamaRunner::Impl::Init() {
  // One OpenBLAS thread per call: the pool splits every product itself, in blocks that do not
  // depend on the thread count; OpenBLAS's own split would (its results change with its threads).
  openblas_set_num_threads(1);
  if (opt_.max_batch <= 0 || opt_.max_seq <= 1)
    return absl::InvalidArgumentError(StrCat("batch must be ≥ 1 and sequence length ≥ 2, got ",
                                             opt_.max_batch, " and ", opt_.max_seq));
  if (opt_.max_seq > c_.max_position_embeddings &&
      c_.rope_scaling.type != RopeScaling::Type::kDynamic)
    return absl::InvalidArgumentError(StrCat("sequence length ", opt_.max_seq,
                                             " exceeds the model's max_position_embeddings ",
                                             c_.max_position_embeddings));
  const int L = c_.num_hidden_layers, H = c_.hidden_size, I = c_.intermediate_size;
  const int Q = c_.q_dim(), KV = c_.kv_dim(), D = c_.head_dim, V = c_.vocab_size;
  const int64_t N = static_cast<int64_t>(opt_.max_batch) * opt_.max_seq;
  const int64_t T = opt_.max_seq;

  // LoRA modules onto the model's linears.
  lora_.resize(static_cast<size_t>(L) * kNumLinearKinds);
  int max_rank = 0;
  if (adapter_ != nullptr) {
    ASSIGN_OR_RETURN(std::vector<size_t> slots, AdapterSlots(c_, *adapter_));
    for (size_t i = 0; i < slots.size(); ++i) {
      const LoraModule& m = adapter_->module(i);
      Lora& x = lora_[slots[i]];
      x.module = static_cast<int>(i);
      x.u.assign(static_cast<size_t>(N) * m.rank, 0.0f);
      if (m.has_r) x.v.assign(static_cast<size_t>(N) * m.rank, 0.0f);
      max_rank = std::max(max_rank, m.rank);
    }
  }

  // Workspace: every buffer a slice of acts_, each starting aligned.
  const int slots = opt_.training ? L : 1;
  const int Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  std::vector<std::pair<float**, int64_t>> plan;  // buffer, its floats
  auto take = [&](float*& buffer, int64_t n) { plan.push_back({&buffer, n}); };
  layers_.resize(static_cast<size_t>(slots));
  for (Layer& Ls : layers_) {
    take(Ls.x, N * H);
    take(Ls.rms1, N);
    take(Ls.h1, N * H);
    take(Ls.q, N * Q);
    take(Ls.k, N * KV);
    take(Ls.v, N * KV);
    if (c_.qk_norm) {
      take(Ls.qraw, N * Q);
      take(Ls.kraw, N * KV);
      take(Ls.rmsq, N * Hq);
      take(Ls.rmsk, N * Hkv);
    }
    take(Ls.p, static_cast<int64_t>(opt_.max_batch) * Hq * T * T);
    take(Ls.att, N * Q);
    take(Ls.x2, N * H);
    take(Ls.rms2, N);
    take(Ls.h2, N * H);
    take(Ls.gate, N * I);
    take(Ls.up, N * I);
    take(Ls.act, N * I);
  }
  take(x_out_, N * H);
  take(rmsf_, N);
  take(hf_, N * H);
  if (opt_.training) {
    take(dres_, N * H);
    take(dh_, N * H);
    take(dq_, N * Q);
    take(datt_, N * Q);
    take(dk_, N * KV);
    take(dv_, N * KV);
    take(dgate_, N * I);
    take(dup_, N * I);
    take(dact_, N * I);
    if (c_.qk_norm) {
      take(dqraw_, N * Q);
      take(dkraw_, N * KV);
    }
  }
  constexpr int64_t kAlign = kBufferAlignment / sizeof(float);
  const auto padded = [](int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; };
  int64_t total = 0;
  for (const auto& [buffer, n] : plan) total += padded(n);
  acts_.assign(static_cast<size_t>(total), 0.0f);
  float* p = acts_.data();
  for (const auto& [buffer, n] : plan) {
    *buffer = p;
    p += padded(n);
  }
  if (opt_.training) {
    du_.assign(static_cast<size_t>(N) * std::max(max_rank, 1), 0.0f);
    du2_.assign(du_.size(), 0.0f);
  }

  cos_.resize(static_cast<size_t>(T) * D / 2);
  sin_.resize(cos_.size());
  head_rows_.reserve(static_cast<size_t>(N));
  head_loss_.reserve(static_cast<size_t>(N));
  scratch_.resize(static_cast<size_t>(pool_.size()));
  for (auto& s : scratch_)
    s.resize(std::max(static_cast<size_t>(T * T), static_cast<size_t>(kHeadChunk) * (V + H)));
  return absl::OkStatus();
}

void LlamaRunner::Impl::MatMulNT(const float* x, const float* wt, float* y, int64_t n_rows,
                                 int64_t n, int64_t m, float alpha, bool accumulate) {
  ForRows(n_rows, [&](int64_t r0, int64_t r1) {
    Gemm(false, true, r1 - r0, m, n, alpha, x + r0 * n, n, wt, n, accumulate ? 1.0f : 0.0f,
         y + r0 * m, m);
  });
}

void LlamaRunner::Impl::MatMulNN(const float* x, const float* w, float* y, int64_t n_rows,
                                 int64_t m, int64_t n, bool accumulate) {
  ForRows(n_rows, [&](int64_t r0, int64_t r1) {
    Gemm(false, false, r1 - r0, n, m, 1.0f, x + r0 * m, m, w, n, accumulate ? 1.0f : 0.0f,
         y + r0 * n, n);
  });
}

void LlamaRunner::Impl::MatMulTN(const float* x, const float* y, float* g, int64_t n_rows,
                                 int64_t a, int64_t b, float alpha) {
  const bool split_a = a >= b;
  ForBlocks(pool_, split_a ? a : b, kColumnBlock, [&](int64_t c0, int64_t c1) {
    const int64_t cn = c1 - c0;
    if (split_a)  // rows c0.. of G = columns c0.. of X, transposed, times Y
      Gemm(true, false, cn, b, n_rows, alpha, x + c0, a, y, b, 1.0f, g + c0 * b, b);
    else  // columns c0.. of G
      Gemm(true, false, a, cn, n_rows, alpha, x, a, y + c0, b, 1.0f, g + c0, b);
  });
}

void LlamaRunner::Impl::LinearForward(int l, LinearKind k, const float* x, float* y) {
  const int64_t in = LinearIn(c_, k), out = LinearOut(c_, k);
  MatMulNT(x, w_.linear(l, k), y, N_, in, out, 1.0f, false);
  if (const float* bias = w_.bias(l, k)) {
    const Eigen::Map<const Eigen::RowVectorXf> row(bias, out);
    ForRows(N_, [&](int64_t begin, int64_t end) {
      Map(y + begin * out, end - begin, out).rowwise() += row;
    });
  }
  Lora* lo = lora(l, k);
  if (lo == nullptr) return;
  const LoraModule& m = adapter_->module(lo->module);
  const float s = static_cast<float>(m.scaling);
  const float* A = adapter_->values().data() + m.a_offset;   // [r, in]
  const float* Bm = adapter_->values().data() + m.b_offset;  // [out, r]
  MatMulNT(x, A, lo->u.data(), N_, in, m.rank, 1.0f, false);
  const float* u = lo->u.data();
  if (m.has_r) {
    MatMulNT(u, adapter_->values().data() + m.r_offset, lo->v.data(), N_, m.rank, m.rank, 1.0f,
             false);
    u = lo->v.data();
  }
  MatMulNT(u, Bm, y, N_, m.rank, out, s, true);
}

void LlamaRunner::Impl::LinearBackward(int l, LinearKind k, const float* x, const float* dy,
                                       float* dx, bool accumulate) {
  const int64_t in = LinearIn(c_, k), out = LinearOut(c_, k);
  MatMulNN(dy, w_.linear(l, k), dx, N_, out, in, accumulate);
  if (sink_ != nullptr &&
      sink_->wanted[static_cast<size_t>(l) * kNumLinearKinds + static_cast<int>(k)])
    sink_->rows({l, k, x, dy, N_});
  Lora* lo = lora(l, k);
  if (lo == nullptr) return;
  const LoraModule& m = adapter_->module(lo->module);
  const float s = static_cast<float>(m.scaling);
  const int64_t r = m.rank;
  const float* A = adapter_->values().data() + m.a_offset;
  const float* Bm = adapter_->values().data() + m.b_offset;
  float* du = du_.data();
  // dv = s·dy·B ([N, r]): the gradient at B's input.
  MatMulNN(dy, Bm, du, N_, out, r, false);
  Map(du, N_, r) *= s;
  if (m.has_r) {
    // v = u·Rᵀ: dR += dvᵀ·u, du = dv·R.
    if (grads_ != nullptr) MatMulTN(du, lo->u.data(), grads_ + m.r_offset, N_, r, r, 1.0f);
    MatMulNN(du, adapter_->values().data() + m.r_offset, du2_.data(), N_, r, r, false);
    du = du2_.data();
  } else if (grads_ != nullptr) {
    // y += s·u·Bᵀ: dB += s·dyᵀ·u; u = x·Aᵀ: dA += duᵀ·x.
    MatMulTN(dy, lo->u.data(), grads_ + m.b_offset, N_, out, r, s);
    MatMulTN(du, x, grads_ + m.a_offset, N_, r, in, 1.0f);
  }
  MatMulNN(du, A, dx, N_, r, in, true);
}

void LlamaRunner::Impl::RmsNormForward(const float* x, const float* g, float* rms, float* y,
                                       int64_t rows, int H) {
  ForRows(rows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* xr = x + n * H;
      double ss = 0;
      for (int j = 0; j < H; ++j) ss += static_cast<double>(xr[j]) * xr[j];
      const float inv = static_cast<float>(1.0 / std::sqrt(ss / H + c_.rms_norm_eps));
      rms[n] = inv;
      float* yr = y + n * H;
      for (int j = 0; j < H; ++j) yr[j] = xr[j] * inv * g[j];
    }
  });
}

void LlamaRunner::Impl::RmsNormBackward(const float* x, const float* g, const float* rms,
                                        const float* dy, float* dx, int64_t rows, int H) {
  // y_j = x_j·ρ·g_j with ρ = (mean(x²)+eps)^(-1/2):
  // ∂/∂x_j = ρ·g_j·dy_j − x_j·ρ³/H·Σ_k g_k·dy_k·x_k.
  ForRows(rows, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float *xr = x + n * H, *dyr = dy + n * H;
      double dot = 0;
      for (int j = 0; j < H; ++j) dot += static_cast<double>(g[j]) * dyr[j] * xr[j];
      const float rho = rms[n];
      const float coef = static_cast<float>(dot * rho * rho * rho / H);
      float* dxr = dx + n * H;
      for (int j = 0; j < H; ++j) dxr[j] += rho * g[j] * dyr[j] - xr[j] * coef;
    }
  });
}

void LlamaRunner::Impl::PrepareRope() {
  // Only dynamic scaling's frequencies depend on the length, and only beyond the context.
  const bool dynamic = c_.rope_scaling.type == RopeScaling::Type::kDynamic;
  const int key = dynamic ? std::max(T_, c_.max_position_embeddings) : 0;
  if (key == rope_key_) return;
  rope_key_ = key;
  RopeTables(c_, T_, opt_.max_seq, cos_, sin_);
}

void LlamaRunner::Impl::Rope(float* x, int heads, bool inverse) {
  // rotate_half: (x1, x2) -> (x1·cos − x2·sin, x2·cos + x1·sin) on the two halves of each head.
  // The inverse (transpose) rotation carries gradients back.
  const int D = c_.head_dim, half = D / 2, width = heads * D;
  const float sign = inverse ? -1.0f : 1.0f;
  ForRows(N_, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t t = n % T_;
      const float *cs = cos_.data() + t * half, *sn = sin_.data() + t * half;
      for (int h = 0; h < heads; ++h) {
        float* xh = x + n * width + h * D;
        for (int j = 0; j < half; ++j) {
          const float x1 = xh[j], x2 = xh[j + half], s = sign * sn[j];
          xh[j] = x1 * cs[j] - x2 * s;
          xh[j + half] = x2 * cs[j] + x1 * s;
        }
      }
    }
  });
}

// Attention products run on sgemm with leading dimensions: a head is a column block of the [N, ·]
// activations.
void LlamaRunner::Impl::AttentionForward(Layer& L, int window) {
  const int D = c_.head_dim, Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  const int Q = c_.q_dim(), KV = c_.kv_dim(), group = Hq / Hkv, T = T_;
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(D));
  pool_.For(static_cast<size_t>(B_) * Hq, [&](size_t item, int) {
    const int b = static_cast<int>(item) / Hq, h = static_cast<int>(item) % Hq, g = h / group;
    const int64_t row0 = static_cast<int64_t>(b) * T;
    const float* Qh = L.q + row0 * Q + h * D;  // [T, D], row stride Q
    const float* K = L.k + row0 * KV + g * D;  // [T, D], row stride KV
    const float* Vg = L.v + row0 * KV + g * D;
    float* P = L.p + (static_cast<int64_t>(b) * Hq + h) * T * T;  // [T, T]
    Gemm(false, true, T, T, D, inv_sqrt_d, Qh, Q, K, KV, 0.0f, P, T);
    for (int i = 0; i < T; ++i) {  // causal softmax over the window: i − W < j ≤ i
      float* pr = P + static_cast<int64_t>(i) * T;
      const int lo = window > 0 ? std::max(0, i - window + 1) : 0;
      Eigen::Map<Eigen::ArrayXf> row(pr + lo, i + 1 - lo);
      row = (row - row.maxCoeff()).exp();
      row /= row.sum();
      std::fill(pr, pr + lo, 0.0f);
      std::fill(pr + i + 1, pr + T, 0.0f);
    }
    Gemm(false, false, T, D, T, 1.0f, P, T, Vg, KV, 0.0f, L.att + row0 * Q + h * D, Q);
  });
}

void LlamaRunner::Impl::AttentionBackward(Layer& L, int window, const float* datt, float* dq,
                                          float* dk, float* dv) {
  const int D = c_.head_dim, Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  const int Q = c_.q_dim(), KV = c_.kv_dim(), group = Hq / Hkv, T = T_;
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(D));
  // One item per (sequence, kv head): the query heads sharing a kv head all add into its dK, dV.
  pool_.For(static_cast<size_t>(B_) * Hkv, [&](size_t item, int thread) {
    const int b = static_cast<int>(item) / Hkv, g = static_cast<int>(item) % Hkv;
    const int64_t row0 = static_cast<int64_t>(b) * T;
    const float* K = L.k + row0 * KV + g * D;
    const float* Vg = L.v + row0 * KV + g * D;
    float* dK = dk + row0 * KV + g * D;
    float* dV = dv + row0 * KV + g * D;
    for (int t = 0; t < T; ++t) {
      std::fill_n(dK + static_cast<int64_t>(t) * KV, D, 0.0f);
      std::fill_n(dV + static_cast<int64_t>(t) * KV, D, 0.0f);
    }
    float* dP = scratch_[static_cast<size_t>(thread)].data();  // [T, T]
    for (int h = g * group; h < (g + 1) * group; ++h) {
      const float* P = L.p + (static_cast<int64_t>(b) * Hq + h) * T * T;
      const float* dO = datt + row0 * Q + h * D;
      const float* Qh = L.q + row0 * Q + h * D;
      Gemm(true, false, T, D, T, 1.0f, P, T, dO, Q, 1.0f, dV, KV);   // dV += Pᵀ·dO
      Gemm(false, true, T, T, D, 1.0f, dO, Q, Vg, KV, 0.0f, dP, T);  // dP = dO·Vᵀ
      for (int i = 0; i < T; ++i) {  // softmax backward: dS = P∘(dP − Σ_j P·dP), scaled
        const float* pr = P + static_cast<int64_t>(i) * T;
        float* dr = dP + static_cast<int64_t>(i) * T;
        const int lo = window > 0 ? std::max(0, i - window + 1) : 0;
        double dot = 0;
        for (int j = lo; j <= i; ++j) dot += static_cast<double>(pr[j]) * dr[j];
        for (int j = lo; j <= i; ++j)
          dr[j] = pr[j] * (dr[j] - static_cast<float>(dot)) * inv_sqrt_d;
        std::fill(dr, dr + lo, 0.0f);
        std::fill(dr + i + 1, dr + T, 0.0f);
      }
      Gemm(false, false, T, D, T, 1.0f, dP, T, K, KV, 0.0f, dq + row0 * Q + h * D, Q);  // dQ = dS·K
      Gemm(true, false, T, D, T, 1.0f, dP, T, Qh, Q, 1.0f, dK, KV);  // dK += dSᵀ·Q
    }
  });
}

LossSum LlamaRunner::Impl::Head(const float* hf, const int32_t* labels, bool backward, float scale,
                                float* dhf) {
  const int H = c_.hidden_size, V = c_.vocab_size;
  head_rows_.clear();
  for (int64_t n = 0; n < N_; ++n)
    if (n % T_ != T_ - 1 && labels[n + 1] != -100) head_rows_.push_back(n);
  if (backward) Map(dhf, N_, H).setZero();
  const int64_t rows = static_cast<int64_t>(head_rows_.size());
  std::vector<double>& loss = head_loss_;
  loss.assign(static_cast<size_t>(rows), 0.0);
  const float* E = w_.lm_head();
  const int64_t chunks = (rows + kHeadChunk - 1) / kHeadChunk;
  pool_.For(static_cast<size_t>(chunks), [&](size_t chunk, int thread) {
    const int64_t r0 = static_cast<int64_t>(chunk) * kHeadChunk;
    const int64_t rn = std::min<int64_t>(kHeadChunk, rows - r0);
    float* logits = scratch_[static_cast<size_t>(thread)].data();  // [rn, V]
    float* hc = logits + static_cast<int64_t>(kHeadChunk) * V;     // [rn, H]
    for (int64_t i = 0; i < rn; ++i) std::copy_n(hf + head_rows_[r0 + i] * H, H, hc + i * H);
    Gemm(false, true, rn, V, H, 1.0f, hc, H, E, H, 0.0f, logits, V);
    for (int64_t i = 0; i < rn; ++i) {
      Eigen::Map<Eigen::ArrayXf> row(logits + i * V, V);
      const int32_t target = labels[head_rows_[r0 + i] + 1];
      const float mx = row.maxCoeff();
      const float lse = mx + std::log((row - mx).exp().sum());
      loss[static_cast<size_t>(r0 + i)] = static_cast<double>(lse) - row(target);
      if (backward) {  // ∂CE/∂logits = softmax − onehot
        row = (row - lse).exp() * scale;
        row(target) -= scale;
      }
    }
    if (backward) {
      Gemm(false, false, rn, H, V, 1.0f, logits, V, E, H, 0.0f, hc, H);
      for (int64_t i = 0; i < rn; ++i) std::copy_n(hc + i * H, H, dhf + head_rows_[r0 + i] * H);
    }
  });
  LossSum out;
  for (double l : loss) out.sum += l;
  out.tokens = rows;
  return out;
}

absl::StatusOr<LossSum> LlamaRunner::Impl::Run(const TokenBatch& batch, bool backward, float scale,
                                               std::span<float> grads, const Sink* sink) {
  if (batch.batch <= 0 || batch.batch > opt_.max_batch || batch.seq < 2 || batch.seq > opt_.max_seq)
    return absl::InvalidArgumentError(StrCat("batch of ", batch.batch, "×", batch.seq,
                                             " tokens; this runner takes up to ", opt_.max_batch,
                                             "×", opt_.max_seq, " (sequence ≥ 2)"));
  const size_t n = static_cast<size_t>(batch.batch) * batch.seq;
  if (batch.input_ids.size() != n || batch.labels.size() != n)
    return absl::InvalidArgumentError(StrCat("batch holds ", batch.input_ids.size(), " ids and ",
                                             batch.labels.size(), " labels, expected ", n));
  for (size_t i = 0; i < n; ++i) {
    if (batch.input_ids[i] < 0 || batch.input_ids[i] >= c_.vocab_size)
      return absl::InvalidArgumentError(StrCat("token id ", batch.input_ids[i], " at position ", i,
                                               " is outside the vocabulary [0, ", c_.vocab_size,
                                               ")"));
    if (batch.labels[i] != -100 && (batch.labels[i] < 0 || batch.labels[i] >= c_.vocab_size))
      return absl::InvalidArgumentError(
          StrCat("label ", batch.labels[i], " at position ", i, " is neither -100 nor a token id"));
  }
  if (backward) {
    if (!opt_.training)
      return absl::FailedPreconditionError("runner was created without training workspace");
    if (sink != nullptr) {
      if (sink->wanted.size() != static_cast<size_t>(c_.num_hidden_layers) * kNumLinearKinds)
        return absl::InvalidArgumentError(StrCat("weight gradients for ", sink->wanted.size(),
                                                 " linears, the model has ",
                                                 c_.num_hidden_layers * kNumLinearKinds));
    } else if (adapter_ == nullptr || grads.size() != adapter_->values().size()) {
      return absl::InvalidArgumentError(
          StrCat("gradient buffer holds ", grads.size(), " floats, the adapter ",
                 adapter_ == nullptr ? 0 : adapter_->values().size()));
    }
  }
  B_ = batch.batch;
  T_ = batch.seq;
  N_ = static_cast<int64_t>(n);
  grads_ = sink != nullptr ? nullptr : grads.data();
  sink_ = sink;
  const int L = c_.num_hidden_layers, H = c_.hidden_size, I = c_.intermediate_size;
  const int D = c_.head_dim, Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  PrepareRope();

  // Embedding.
  for (size_t i = 0; i < n; ++i)
    std::copy_n(w_.embed() + static_cast<int64_t>(batch.input_ids[i]) * H, H,
                layers_[0].x + static_cast<int64_t>(i) * H);

  for (int l = 0; l < L; ++l) {
    Layer& Ls = layers_[opt_.training ? l : 0];
    RmsNormForward(Ls.x, w_.input_norm(l), Ls.rms1, Ls.h1, N_, H);
    if (c_.qk_norm) {  // Qwen3: each head of q and k RMS-normalised before RoPE
      LinearForward(l, LinearKind::kQ, Ls.h1, Ls.qraw);
      LinearForward(l, LinearKind::kK, Ls.h1, Ls.kraw);
      RmsNormForward(Ls.qraw, w_.q_norm(l), Ls.rmsq, Ls.q, N_ * Hq, D);
      RmsNormForward(Ls.kraw, w_.k_norm(l), Ls.rmsk, Ls.k, N_ * Hkv, D);
    } else {
      LinearForward(l, LinearKind::kQ, Ls.h1, Ls.q);
      LinearForward(l, LinearKind::kK, Ls.h1, Ls.k);
    }
    LinearForward(l, LinearKind::kV, Ls.h1, Ls.v);
    Rope(Ls.q, Hq, false);
    Rope(Ls.k, Hkv, false);
    AttentionForward(Ls, c_.window(l));
    LinearForward(l, LinearKind::kO, Ls.att, Ls.x2);
    Map(Ls.x2, N_, H) += CMap(Ls.x, N_, H);
    RmsNormForward(Ls.x2, w_.post_norm(l), Ls.rms2, Ls.h2, N_, H);
    LinearForward(l, LinearKind::kGate, Ls.h2, Ls.gate);
    LinearForward(l, LinearKind::kUp, Ls.h2, Ls.up);
    ForElements(N_ * I, [&](int64_t begin, int64_t end) {
      Eigen::Map<const Eigen::ArrayXf> z(Ls.gate + begin, end - begin),
          up(Ls.up + begin, end - begin);
      Eigen::Map<Eigen::ArrayXf>(Ls.act + begin, end - begin) = z / (1.0f + (-z).exp()) * up;
    });
    float* out = (opt_.training && l + 1 < L) ? layers_[l + 1].x : x_out_;
    LinearForward(l, LinearKind::kDown, Ls.act, out);
    Map(out, N_, H) += CMap(Ls.x2, N_, H);
    if (!opt_.training && l + 1 < L) std::copy_n(x_out_, N_ * H, layers_[0].x);
  }
  RmsNormForward(x_out_, w_.final_norm(), rmsf_, hf_, N_, H);
  LossSum loss = Head(hf_, batch.labels.data(), backward, scale, dh_);
  if (!backward) return loss;

  // Backward: dres_ carries ∂/∂(residual stream) from the head down to layer 0.
  Map(dres_, N_, H).setZero();
  RmsNormBackward(x_out_, w_.final_norm(), rmsf_, dh_, dres_, N_, H);
  for (int l = L - 1; l >= 0; --l) {
    Layer& Ls = layers_[l];
    // MLP: out = x2 + down(silu(gate)·up).
    LinearBackward(l, LinearKind::kDown, Ls.act, dres_, dact_, false);
    ForElements(N_ * I, [&](int64_t begin, int64_t end) {
      const int64_t n = end - begin;
      Eigen::Map<const Eigen::ArrayXf> z(Ls.gate + begin, n), up(Ls.up + begin, n),
          dact(dact_ + begin, n);
      Eigen::Map<Eigen::ArrayXf> sig(dgate_ + begin, n), dup(dup_ + begin, n);
      sig = 1.0f / (1.0f + (-z).exp());
      dup = dact * z * sig;
      sig = dact * up * sig * (1.0f + z * (1.0f - sig));  // now ∂/∂gate
    });
    LinearBackward(l, LinearKind::kGate, Ls.h2, dgate_, dh_, false);
    LinearBackward(l, LinearKind::kUp, Ls.h2, dup_, dh_, true);
    RmsNormBackward(Ls.x2, w_.post_norm(l), Ls.rms2, dh_, dres_, N_, H);
    // Attention: x2 = x + o(attention(rope(norm(q)), rope(norm(k)), v)).
    LinearBackward(l, LinearKind::kO, Ls.att, dres_, datt_, false);
    AttentionBackward(Ls, c_.window(l), datt_, dq_, dk_, dv_);
    Rope(dq_, Hq, true);
    Rope(dk_, Hkv, true);
    float *dq = dq_, *dk = dk_;
    if (c_.qk_norm) {
      Map(dqraw_, N_, c_.q_dim()).setZero();
      Map(dkraw_, N_, c_.kv_dim()).setZero();
      RmsNormBackward(Ls.qraw, w_.q_norm(l), Ls.rmsq, dq_, dqraw_, N_ * Hq, D);
      RmsNormBackward(Ls.kraw, w_.k_norm(l), Ls.rmsk, dk_, dkraw_, N_ * Hkv, D);
      dq = dqraw_;
      dk = dkraw_;
    }
    LinearBackward(l, LinearKind::kQ, Ls.h1, dq, dh_, false);
    LinearBackward(l, LinearKind::kK, Ls.h1, dk, dh_, true);
    LinearBackward(l, LinearKind::kV, Ls.h1, dv_, dh_, true);
    RmsNormBackward(Ls.x, w_.input_norm(l), Ls.rms1, dh_, dres_, N_, H);
  }
  return loss;
}

// ---------------------------------------------------------------------------------------------

LlamaRunner::LlamaRunner(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
LlamaRunner::~LlamaRunner() = default;

absl::StatusOr<std::unique_ptr<LlamaRunner>> LlamaRunner::Create(const LlamaWeights* weights,
                                                                 const Adapter* adapter,
                                                                 const Options& options) {
  auto impl = std::make_unique<Impl>(weights, adapter, options);
  RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<LlamaRunner>(new LlamaRunner(std::move(impl)));
}

absl::StatusOr<LossSum> LlamaRunner::Forward(const TokenBatch& batch) {
  return impl_->Run(batch, false, 0.0f, {});
}

absl::StatusOr<std::vector<float>> LlamaRunner::NextTokenLogits(std::span<const int32_t> ids) {
  if (ids.empty()) return absl::InvalidArgumentError("no tokens to continue");
  // A sequence of one is padded to the runner's minimum of two; the causal mask keeps the pad out
  // of the first position's output.
  TokenBatch batch{1, std::max<int>(2, static_cast<int>(ids.size())), {ids.begin(), ids.end()}, {}};
  batch.input_ids.resize(static_cast<size_t>(batch.seq), ids.back());
  batch.labels.assign(batch.input_ids.size(), -100);
  RETURN_IF_ERROR(impl_->Run(batch, false, 0.0f, {}).status());
  return impl_->LogitsAt(static_cast<int64_t>(ids.size()) - 1);
}

absl::StatusOr<LossSum> LlamaRunner::ForwardBackward(const TokenBatch& batch, float scale,
                                                     std::span<float> grads) {
  return impl_->Run(batch, true, scale, grads);
}

absl::StatusOr<LossSum> LlamaRunner::WeightGradients(const TokenBatch& batch, float scale,
                                                     const std::vector<float*>& dense) {
  std::vector<bool> wanted(dense.size());
  for (size_t i = 0; i < dense.size(); ++i) wanted[i] = dense[i] != nullptr;
  return WeightGradientRows(batch, scale, wanted, [&](const GradientRows& g) {
    impl_->AddWeightGradient(
        g, dense[static_cast<size_t>(g.layer) * kNumLinearKinds + static_cast<int>(g.kind)]);
  });
}

absl::StatusOr<LossSum> LlamaRunner::WeightGradientRows(
    const TokenBatch& batch, float scale, const std::vector<bool>& wanted,
    const std::function<void(const GradientRows&)>& sink) {
  const Impl::Sink s{wanted, sink};
  return impl_->Run(batch, true, scale, {}, &s);
}

}  // namespace fedlora::common
