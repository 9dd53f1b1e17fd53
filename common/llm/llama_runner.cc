// LlamaRunner (llama.h): a batch of sequences through the model, forward and backward, on the
// layers of layers.h, in one workspace allocated when the runner is created.
#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/layers.h"
#include "common/llm/llama.h"
#include "common/tensor/eigen_types.h"
#include "common/tensor/gemm.h"

namespace fedlora::common {

int64_t TokenBatch::TargetCount() const {
  int64_t n = 0;
  for (int b = 0; b < batch; ++b)
    for (int t = 1; t < seq; ++t) n += labels[static_cast<size_t>(b) * seq + t] != -100;
  return n;
}

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
  std::vector<float> LogitsAt(int64_t n) {
    std::vector<float> logits(static_cast<size_t>(c_.vocab_size));
    MatMulNT(pool_, hf_ + n * c_.hidden_size, w_.lm_head(), logits.data(), 1, c_.hidden_size,
             c_.vocab_size, 1.0f, false);
    return logits;
  }
  size_t workspace_bytes() const {
    size_t floats = acts_.size() + lora_ur_.size() + du_.size() + du2_.size();
    for (const AlignedFloats& u : lora_u_) floats += u.size();
    for (const AlignedFloats& s : scratch_) floats += s.size();
    return floats * sizeof(float);
  }
  // out ([out, in]) += the rows' weight gradient dyᵀ·x.
  void AddWeightGradient(const GradientRows& g, float* out) {
    MatMulTN(pool_, g.dy, g.x, out, g.rows, LinearOut(c_, g.kind), LinearIn(c_, g.kind), 1.0f);
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
  absl::Status CheckBatch(const TokenBatch& batch, bool backward, std::span<float> grads,
                          const Sink* sink) const;
  void LinearForwardAt(int l, LinearKind k, const float* x, float* y);
  // dx (+)= ∂/∂x; the adapter's gradients into lora_grads_, or the rows to the sink.
  void LinearBackwardAt(int l, LinearKind k, const float* x, const float* dy, float* dx,
                        bool accumulate);
  // Layer l from Ls.x to `out` ([N, H]), keeping what the backward needs in Ls.
  void LayerForward(int l, Layer& Ls, float* out);
  // From dres_ (∂/∂ layer l's output) to ∂/∂ its input, in dres_.
  void LayerBackward(int l, Layer& Ls);
  // The rotary tables for sequences of T_ positions (rebuilt only when dynamic scaling asks).
  void PrepareRope();
  // The LM head and cross-entropy over the rows with a target; with `backward`, dhf [N, H] gets
  // scale·∂(Σ CE)/∂hf.
  LossSum Head(const float* hf, const int32_t* labels, bool backward, float scale, float* dhf);

  const LlamaWeights& w_;
  const LlamaConfig& c_;
  const Adapter* adapter_;
  Options opt_;
  ThreadPool pool_;
  std::vector<Linear> linears_;        // [L·7]
  std::vector<AlignedFloats> lora_u_;  // [L·7] x·Aᵀ [N, r], kept for the backward; empty: no module
  AlignedFloats lora_ur_;              // [N, max r] u·Rᵀ of the LoRA-SB linear running (scratch)
  std::vector<LoraGrads> lora_grads_;  // [L·7], into the batch's gradients (or none)

  // Current batch shape.
  int B_ = 0, T_ = 0;
  int64_t N_ = 0;
  const Sink* sink_ = nullptr;  // weight gradients' consumer, or null

  AlignedFloats acts_;          // all saved activations, each buffer aligned
  std::vector<Layer> layers_;   // L slots when training, else 1
  std::vector<float*> inputs_;  // [L] of [N, H]: each layer's input, with checkpointing
  float* x_out_ = nullptr;      // [N, H] output of the last layer
  float* rmsf_ = nullptr;       // [N]
  float* hf_ = nullptr;         // [N, H] final-norm output
  // Backward scratch.
  float *dres_ = nullptr, *dh_ = nullptr, *dq_ = nullptr, *dk_ = nullptr, *dv_ = nullptr,
        *datt_ = nullptr, *dgate_ = nullptr, *dup_ = nullptr, *dact_ = nullptr;
  float *dqraw_ = nullptr, *dkraw_ = nullptr;  // qk_norm: gradients at q_proj's, k_proj's output
  AlignedFloats du_, du2_;                     // [N, max r]
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
  UseOneBlasThread();
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
  ASSIGN_OR_RETURN(linears_, ModelLinears(w_, adapter_));
  lora_u_.resize(linears_.size());
  lora_grads_.resize(linears_.size());
  int64_t max_rank = 1;
  bool lora_sb = false;
  for (size_t i = 0; i < linears_.size(); ++i) {
    if (linears_[i].module < 0) continue;
    lora_u_[i].assign(static_cast<size_t>(N * linears_[i].rank), 0.0f);
    lora_sb = lora_sb || linears_[i].r != nullptr;
    max_rank = std::max(max_rank, linears_[i].rank);
  }
  if (lora_sb) lora_ur_.assign(static_cast<size_t>(N * max_rank), 0.0f);

  // Workspace: every buffer a slice of acts_, each starting aligned. Training keeps every layer's
  // activations, or with checkpointing every layer's input and one layer's activations.
  const bool all_layers = opt_.training && !opt_.checkpoint_activations;
  const int slots = all_layers ? L : 1;
  const int Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  std::vector<std::pair<float**, int64_t>> plan;  // buffer, its floats
  auto take = [&](float*& buffer, int64_t n) { plan.push_back({&buffer, n}); };
  layers_.resize(static_cast<size_t>(slots));
  if (opt_.training && opt_.checkpoint_activations) {
    inputs_.resize(static_cast<size_t>(L));
    for (float*& x : inputs_) take(x, N * H);
  }
  for (Layer& Ls : layers_) {
    if (inputs_.empty()) take(Ls.x, N * H);
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
    for (float** d : {&dres_, &dh_}) take(*d, N * H);
    for (float** d : {&dq_, &datt_}) take(*d, N * Q);
    for (float** d : {&dk_, &dv_}) take(*d, N * KV);
    for (float** d : {&dgate_, &dup_, &dact_}) take(*d, N * I);
    if (c_.qk_norm) {
      take(dqraw_, N * Q);
      take(dkraw_, N * KV);
    }
    du_.assign(static_cast<size_t>(N * max_rank), 0.0f);
    du2_.assign(du_.size(), 0.0f);
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

  cos_.resize(static_cast<size_t>(T) * D / 2);
  sin_.resize(cos_.size());
  head_rows_.reserve(static_cast<size_t>(N));
  head_loss_.reserve(static_cast<size_t>(N));
  scratch_.resize(static_cast<size_t>(pool_.size()));
  for (auto& s : scratch_)
    s.resize(std::max(static_cast<size_t>(T * T), static_cast<size_t>(kHeadChunk) * (V + H)));
  return absl::OkStatus();
}

void LlamaRunner::Impl::LinearForwardAt(int l, LinearKind k, const float* x, float* y) {
  const size_t slot = LinearSlot(l, k);
  LinearForward(pool_, linears_[slot], x, y, N_, lora_u_[slot].data(), lora_ur_.data());
}

void LlamaRunner::Impl::LinearBackwardAt(int l, LinearKind k, const float* x, const float* dy,
                                         float* dx, bool accumulate) {
  const size_t slot = LinearSlot(l, k);
  if (sink_ != nullptr && sink_->wanted[slot]) sink_->rows({l, k, x, dy, N_});
  LinearBackward(pool_, linears_[slot], x, lora_u_[slot].data(), dy, dx, accumulate, N_,
                 lora_grads_[slot], du_.data(), du2_.data());
}

void LlamaRunner::Impl::PrepareRope() {
  // Only dynamic scaling's frequencies depend on the length, and only beyond the context.
  const bool dynamic = c_.rope_scaling.type == RopeScaling::Type::kDynamic;
  const int key = dynamic ? std::max(T_, c_.max_position_embeddings) : 0;
  if (key == rope_key_) return;
  rope_key_ = key;
  RopeTables(c_, T_, opt_.max_seq, cos_, sin_);
}

LossSum LlamaRunner::Impl::Head(const float* hf, const int32_t* labels, bool backward, float scale,
                                float* dhf) {
  const int H = c_.hidden_size, V = c_.vocab_size;
  head_rows_.clear();
  for (int64_t n = 0; n < N_; ++n)
    if (n % T_ != T_ - 1 && labels[n + 1] != -100) head_rows_.push_back(n);
  if (backward) MapF(dhf, N_, H).setZero();
  const int64_t rows = static_cast<int64_t>(head_rows_.size());
  std::vector<double>& loss = head_loss_;
  loss.assign(static_cast<size_t>(rows), 0.0);
  const StoredSpan E = w_.lm_head();
  const int64_t chunks = (rows + kHeadChunk - 1) / kHeadChunk;
  pool_.For(static_cast<size_t>(chunks), [&](size_t chunk, int thread) {
    const int64_t r0 = static_cast<int64_t>(chunk) * kHeadChunk;
    const int64_t rn = std::min<int64_t>(kHeadChunk, rows - r0);
    float* logits = scratch_[static_cast<size_t>(thread)].data();  // [rn, V]
    float* hc = logits + static_cast<int64_t>(kHeadChunk) * V;     // [rn, H]
    for (int64_t i = 0; i < rn; ++i) std::copy_n(hf + head_rows_[r0 + i] * H, H, hc + i * H);
    GemmStored(true, rn, V, H, 1.0f, hc, H, E, H, 0.0f, logits, V);
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
      GemmStored(false, rn, H, V, 1.0f, logits, V, E, H, 0.0f, hc, H);
      for (int64_t i = 0; i < rn; ++i) std::copy_n(hc + i * H, H, dhf + head_rows_[r0 + i] * H);
    }
  });
  LossSum out;
  for (double l : loss) out.sum += l;
  out.tokens = rows;
  return out;
}

absl::Status LlamaRunner::Impl::CheckBatch(const TokenBatch& batch, bool backward,
                                           std::span<float> grads, const Sink* sink) const {
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
  if (!backward) return absl::OkStatus();
  if (!opt_.training)
    return absl::FailedPreconditionError("runner was created without training workspace");
  if (sink != nullptr) {
    if (sink->wanted.size() != static_cast<size_t>(c_.num_hidden_layers) * kNumLinearKinds)
      return absl::InvalidArgumentError(StrCat("weight gradients for ", sink->wanted.size(),
                                               " linears, the model has ",
                                               c_.num_hidden_layers * kNumLinearKinds));
  } else if (adapter_ == nullptr || grads.size() != adapter_->values().size()) {
    return absl::InvalidArgumentError(StrCat("gradient buffer holds ", grads.size(),
                                             " floats, the adapter ",
                                             adapter_ == nullptr ? 0 : adapter_->values().size()));
  }
  return absl::OkStatus();
}

void LlamaRunner::Impl::LayerForward(int l, Layer& Ls, float* out) {
  const int H = c_.hidden_size, D = c_.head_dim;
  const int Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  const double eps = c_.rms_norm_eps;
  RmsNormForward(pool_, Ls.x, w_.input_norm(l), eps, Ls.rms1, Ls.h1, N_, H);
  if (c_.qk_norm) {  // Qwen3: each head of q and k RMS-normalised before RoPE
    LinearForwardAt(l, LinearKind::kQ, Ls.h1, Ls.qraw);
    LinearForwardAt(l, LinearKind::kK, Ls.h1, Ls.kraw);
    RmsNormForward(pool_, Ls.qraw, w_.q_norm(l), eps, Ls.rmsq, Ls.q, N_ * Hq, D);
    RmsNormForward(pool_, Ls.kraw, w_.k_norm(l), eps, Ls.rmsk, Ls.k, N_ * Hkv, D);
  } else {
    LinearForwardAt(l, LinearKind::kQ, Ls.h1, Ls.q);
    LinearForwardAt(l, LinearKind::kK, Ls.h1, Ls.k);
  }
  LinearForwardAt(l, LinearKind::kV, Ls.h1, Ls.v);
  Rope(pool_, Ls.q, N_, Hq, D, cos_.data(), sin_.data(), 0, T_, false);
  Rope(pool_, Ls.k, N_, Hkv, D, cos_.data(), sin_.data(), 0, T_, false);
  AttentionForward(pool_, c_, Ls.q, Ls.k, Ls.v, B_, T_, c_.window(l), Ls.p, Ls.att);
  LinearForwardAt(l, LinearKind::kO, Ls.att, Ls.x2);
  MapF(Ls.x2, N_, H) += ConstMapF(Ls.x, N_, H);
  RmsNormForward(pool_, Ls.x2, w_.post_norm(l), eps, Ls.rms2, Ls.h2, N_, H);
  LinearForwardAt(l, LinearKind::kGate, Ls.h2, Ls.gate);
  LinearForwardAt(l, LinearKind::kUp, Ls.h2, Ls.up);
  SwigluForward(pool_, Ls.gate, Ls.up, Ls.act, N_ * c_.intermediate_size);
  LinearForwardAt(l, LinearKind::kDown, Ls.act, out);
  MapF(out, N_, H) += ConstMapF(Ls.x2, N_, H);
}

void LlamaRunner::Impl::LayerBackward(int l, Layer& Ls) {
  const int H = c_.hidden_size, D = c_.head_dim;
  const int Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  // MLP: out = x2 + down(silu(gate)·up).
  LinearBackwardAt(l, LinearKind::kDown, Ls.act, dres_, dact_, false);
  SwigluBackward(pool_, Ls.gate, Ls.up, dact_, dgate_, dup_, N_ * c_.intermediate_size);
  LinearBackwardAt(l, LinearKind::kGate, Ls.h2, dgate_, dh_, false);
  LinearBackwardAt(l, LinearKind::kUp, Ls.h2, dup_, dh_, true);
  RmsNormBackward(pool_, Ls.x2, w_.post_norm(l), Ls.rms2, dh_, dres_, N_, H);
  // Attention: x2 = x + o(attention(rope(norm(q)), rope(norm(k)), v)).
  LinearBackwardAt(l, LinearKind::kO, Ls.att, dres_, datt_, false);
  AttentionBackward(pool_, c_, Ls.q, Ls.k, Ls.v, Ls.p, datt_, B_, T_, c_.window(l), dq_, dk_, dv_,
                    scratch_);
  Rope(pool_, dq_, N_, Hq, D, cos_.data(), sin_.data(), 0, T_, true);
  Rope(pool_, dk_, N_, Hkv, D, cos_.data(), sin_.data(), 0, T_, true);
  float *dq = dq_, *dk = dk_;
  if (c_.qk_norm) {
    MapF(dqraw_, N_, c_.q_dim()).setZero();
    MapF(dkraw_, N_, c_.kv_dim()).setZero();
    RmsNormBackward(pool_, Ls.qraw, w_.q_norm(l), Ls.rmsq, dq_, dqraw_, N_ * Hq, D);
    RmsNormBackward(pool_, Ls.kraw, w_.k_norm(l), Ls.rmsk, dk_, dkraw_, N_ * Hkv, D);
    dq = dqraw_;
    dk = dkraw_;
  }
  LinearBackwardAt(l, LinearKind::kQ, Ls.h1, dq, dh_, false);
  LinearBackwardAt(l, LinearKind::kK, Ls.h1, dk, dh_, true);
  LinearBackwardAt(l, LinearKind::kV, Ls.h1, dv_, dh_, true);
  RmsNormBackward(pool_, Ls.x, w_.input_norm(l), Ls.rms1, dh_, dres_, N_, H);
}

absl::StatusOr<LossSum> LlamaRunner::Impl::Run(const TokenBatch& batch, bool backward, float scale,
                                               std::span<float> grads, const Sink* sink) {
  RETURN_IF_ERROR(CheckBatch(batch, backward, grads, sink));
  B_ = batch.batch;
  T_ = batch.seq;
  N_ = static_cast<int64_t>(B_) * T_;
  float* const adapter_grads = sink != nullptr ? nullptr : grads.data();
  sink_ = sink;
  for (size_t i = 0; i < linears_.size(); ++i) {
    const Linear& p = linears_[i];
    if (adapter_grads == nullptr || p.module < 0) {
      lora_grads_[i] = {};
      continue;
    }
    const LoraModule& m = adapter_->module(static_cast<size_t>(p.module));
    lora_grads_[i] = {adapter_grads + m.a_offset, adapter_grads + m.b_offset,
                      m.has_r ? adapter_grads + m.r_offset : nullptr};
  }
  const int L = c_.num_hidden_layers, H = c_.hidden_size;
  PrepareRope();

  // Layer l's input: its slot's, or with checkpointing the kept copy the single slot points at.
  const bool checkpointing = !inputs_.empty();
  const auto input = [&](int l) {
    return checkpointing ? inputs_[static_cast<size_t>(l)] : layers_[layers_.size() == 1 ? 0 : l].x;
  };
  const auto slot = [&](int l) -> Layer& {
    Layer& Ls = layers_[layers_.size() == 1 ? 0 : static_cast<size_t>(l)];
    Ls.x = input(l);
    return Ls;
  };
  EmbeddingForward(batch.input_ids.data(), N_, w_.embed(), H, input(0));
  for (int l = 0; l < L; ++l) {
    Layer& Ls = slot(l);
    LayerForward(l, Ls, opt_.training && l + 1 < L ? input(l + 1) : x_out_);
    if (!opt_.training && l + 1 < L) std::copy_n(x_out_, N_ * H, Ls.x);
  }
  RmsNormForward(pool_, x_out_, w_.final_norm(), c_.rms_norm_eps, rmsf_, hf_, N_, H);
  LossSum loss = Head(hf_, batch.labels.data(), backward, scale, dh_);
  if (!backward) return loss;

  // Backward: dres_ carries ∂/∂(residual stream) from the head down to layer 0.
  MapF(dres_, N_, H).setZero();
  RmsNormBackward(pool_, x_out_, w_.final_norm(), rmsf_, dh_, dres_, N_, H);
  for (int l = L - 1; l >= 0; --l) {
    Layer& Ls = slot(l);
    // Its activations again, from its input (the last layer's are still in the slot).
    if (checkpointing && l + 1 < L) LayerForward(l, Ls, x_out_);
    LayerBackward(l, Ls);
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

size_t LlamaRunner::workspace_bytes() const { return impl_->workspace_bytes(); }

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
    impl_->AddWeightGradient(g, dense[LinearSlot(g.layer, g.kind)]);
  });
}

absl::StatusOr<LossSum> LlamaRunner::WeightGradientRows(
    const TokenBatch& batch, float scale, const std::vector<bool>& wanted,
    const std::function<void(const GradientRows&)>& sink) {
  const Impl::Sink s{wanted, sink};
  return impl_->Run(batch, true, scale, {}, &s);
}

}  // namespace fedlora::common
