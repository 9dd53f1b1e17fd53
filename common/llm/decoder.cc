#include "common/llm/decoder.h"

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/base/parallel.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/layers.h"

namespace fedlora::common {

class Decoder::Impl {
 public:
  Impl(const LlamaWeights* w, const Adapter* adapter, int max_seq, int threads)
      : w_(*w), c_(w->config()), adapter_(adapter), max_seq_(max_seq), pool_(threads) {}

  absl::Status Init() {
    UseOneBlasThread();
    if (max_seq_ < 1 || max_seq_ > c_.max_position_embeddings)
      return absl::InvalidArgumentError(StrCat("a decoder of ", max_seq_,
                                               " positions; the model takes 1 to ",
                                               c_.max_position_embeddings));
    ASSIGN_OR_RETURN(linears_, ModelLinears(w_, adapter_));
    for (const Linear& p : linears_) max_rank_ = std::max(max_rank_, p.rank);
    const int64_t KV = c_.kv_dim();
    k_cache_.assign(static_cast<size_t>(c_.num_hidden_layers) * max_seq_ * KV, 0.0f);
    v_cache_.assign(k_cache_.size(), 0.0f);
    // Within max_position_embeddings every rope type's frequencies are those of any length.
    RopeTables(c_, max_seq_, max_seq_, cos_, sin_);
    logits_.resize(static_cast<size_t>(c_.vocab_size));
    scratch_.resize(static_cast<size_t>(pool_.size()));
    return absl::OkStatus();
  }

  absl::StatusOr<std::span<const float>> Append(std::span<const int32_t> ids);

  int length_ = 0;
  int max_seq() const { return max_seq_; }

 private:
  // y = x·Wᵀ (+ bias) (+ s·B·(R)·A·x) for m rows.
  void LinearAt(int l, LinearKind k, const float* x, float* y, int64_t m) {
    LinearForward(pool_, linears_[LinearSlot(l, k)], x, y, m, u_.data(), u2_.data());
  }
  // Sizes the buffers for m new positions after `first`.
  void Reserve(int64_t m, int first);
  // Layer l for the m positions first.. in x_ ([m, H]), their keys and values into the cache.
  void LayerForward(int l, int64_t m, int first);

  const LlamaWeights& w_;
  const LlamaConfig& c_;
  const Adapter* adapter_;
  const int max_seq_;
  ThreadPool pool_;
  std::vector<Linear> linears_;  // [L·7]
  int64_t max_rank_ = 1;
  AlignedFloats k_cache_, v_cache_;  // [L, max_seq, KV], after RoPE (keys)
  std::vector<float> cos_, sin_;     // [max_seq, D/2]
  // Per call, for m new positions: x_, h_ [m, H]; q_, att_ [m, Hq·D]; k_, v_ [m, Hkv·D];
  // gate_, up_ [m, I]; u_, u2_ [m, r]; logits_ [V].
  AlignedFloats x_, h_, q_, k_, v_, att_, gate_, up_, u_, u2_, logits_;
  std::vector<AlignedFloats> scratch_;  // per thread: attention probabilities [m, first + m]
};

void Decoder::Impl::Reserve(int64_t m, int first) {
  const int64_t H = c_.hidden_size, I = c_.intermediate_size;
  x_.resize(static_cast<size_t>(m * H));
  h_.resize(x_.size());
  q_.resize(static_cast<size_t>(m * c_.q_dim()));
  att_.resize(q_.size());
  k_.resize(static_cast<size_t>(m * c_.kv_dim()));
  v_.resize(k_.size());
  gate_.resize(static_cast<size_t>(m * I));
  up_.resize(gate_.size());
  u_.resize(static_cast<size_t>(m * max_rank_));
  u2_.resize(u_.size());
  for (AlignedFloats& s : scratch_) s.resize(static_cast<size_t>(m * (first + m)));
}

void Decoder::Impl::LayerForward(int l, int64_t m, int first) {
  const int H = c_.hidden_size, D = c_.head_dim, KV = c_.kv_dim();
  const int Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads;
  const double eps = c_.rms_norm_eps;
  RmsNormForward(pool_, x_.data(), w_.input_norm(l), eps, nullptr, h_.data(), m, H);
  LinearAt(l, LinearKind::kQ, h_.data(), q_.data(), m);
  LinearAt(l, LinearKind::kK, h_.data(), k_.data(), m);
  LinearAt(l, LinearKind::kV, h_.data(), v_.data(), m);
  if (c_.qk_norm) {  // in place: each row of a head is read whole before it is written
    RmsNormForward(pool_, q_.data(), w_.q_norm(l), eps, nullptr, q_.data(), m * Hq, D);
    RmsNormForward(pool_, k_.data(), w_.k_norm(l), eps, nullptr, k_.data(), m * Hkv, D);
  }
  Rope(pool_, q_.data(), m, Hq, D, cos_.data(), sin_.data(), first, m, false);
  Rope(pool_, k_.data(), m, Hkv, D, cos_.data(), sin_.data(), first, m, false);
  float* K = k_cache_.data() + static_cast<int64_t>(l) * max_seq_ * KV;
  float* V = v_cache_.data() + static_cast<int64_t>(l) * max_seq_ * KV;
  std::copy(k_.begin(), k_.end(), K + static_cast<int64_t>(first) * KV);
  std::copy(v_.begin(), v_.end(), V + static_cast<int64_t>(first) * KV);
  CachedAttentionForward(pool_, c_, q_.data(), K, V, static_cast<int>(m), first, c_.window(l),
                         scratch_, att_.data());
  LinearAt(l, LinearKind::kO, att_.data(), h_.data(), m);
  for (size_t i = 0; i < x_.size(); ++i) x_[i] += h_[i];
  RmsNormForward(pool_, x_.data(), w_.post_norm(l), eps, nullptr, h_.data(), m, H);
  LinearAt(l, LinearKind::kGate, h_.data(), gate_.data(), m);
  LinearAt(l, LinearKind::kUp, h_.data(), up_.data(), m);
  SwigluForward(pool_, gate_.data(), up_.data(), gate_.data(), m * c_.intermediate_size);
  LinearAt(l, LinearKind::kDown, gate_.data(), h_.data(), m);
  for (size_t i = 0; i < x_.size(); ++i) x_[i] += h_[i];
}

absl::StatusOr<std::span<const float>> Decoder::Impl::Append(std::span<const int32_t> ids) {
  const int64_t m = static_cast<int64_t>(ids.size());
  if (m == 0) return absl::InvalidArgumentError("no tokens to append");
  if (length_ + m > max_seq_)
    return absl::OutOfRangeError(
        StrCat(length_, " cached positions and ", m, " new ones exceed the decoder's ", max_seq_));
  for (int32_t id : ids)
    if (id < 0 || id >= c_.vocab_size)
      return absl::InvalidArgumentError(
          StrCat("token id ", id, " is outside the vocabulary [0, ", c_.vocab_size, ")"));
  const int H = c_.hidden_size, first = length_;
  Reserve(m, first);
  EmbeddingForward(ids.data(), m, w_.embed(), H, x_.data());
  for (int l = 0; l < c_.num_hidden_layers; ++l) LayerForward(l, m, first);
  length_ = first + static_cast<int>(m);
  RmsNormForward(pool_, x_.data() + (m - 1) * H, w_.final_norm(), c_.rms_norm_eps, nullptr,
                 h_.data(), 1, H);
  MatMulNT(pool_, h_.data(), w_.lm_head(), logits_.data(), 1, H, c_.vocab_size, 1.0f, false);
  return std::span<const float>(logits_);
}

Decoder::Decoder(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Decoder::~Decoder() = default;

absl::StatusOr<std::unique_ptr<Decoder>> Decoder::Create(const LlamaWeights* weights,
                                                         const Adapter* adapter, int max_seq,
                                                         int threads) {
  auto impl = std::make_unique<Impl>(weights, adapter, max_seq, threads);
  RETURN_IF_ERROR(impl->Init());
  return std::unique_ptr<Decoder>(new Decoder(std::move(impl)));
}

void Decoder::Reset() { impl_->length_ = 0; }
int Decoder::length() const { return impl_->length_; }
int Decoder::max_seq() const { return impl_->max_seq(); }
absl::StatusOr<std::span<const float>> Decoder::Append(std::span<const int32_t> ids) {
  return impl_->Append(ids);
}

int32_t SampleToken(std::span<const float> logits, const SamplingOptions& options,
                    std::mt19937_64& rng) {
  const auto argmax = [&] {
    return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  };
  if (options.temperature <= 0) return argmax();
  // Probabilities of logits / T in double, most probable first; keep the prefix whose mass
  // reaches top_p.
  const double max = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  for (size_t i = 0; i < p.size(); ++i) p[i] = std::exp((logits[i] - max) / options.temperature);
  const double total = std::accumulate(p.begin(), p.end(), 0.0);
  std::vector<int32_t> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return p[a] > p[b]; });
  size_t keep = 0;
  double mass = 0;
  while (keep < order.size() && (keep == 0 || mass < options.top_p * total))
    mass += p[order[keep++]];
  std::vector<double> kept(keep);
  for (size_t i = 0; i < keep; ++i) kept[i] = p[order[i]];
  std::discrete_distribution<size_t> draw(kept.begin(), kept.end());
  return order[draw(rng)];
}

absl::StatusOr<std::vector<int32_t>> Generate(
    Decoder& decoder, std::span<const int32_t> prompt, std::span<const int32_t> eos,
    const SamplingOptions& options, std::mt19937_64& rng,
    const std::function<void(std::span<const float>)>& on_logits) {
  if (prompt.empty()) return absl::InvalidArgumentError("an empty prompt");
  if (static_cast<int64_t>(prompt.size()) + options.max_new_tokens - 1 > decoder.max_seq())
    return absl::InvalidArgumentError(
        StrCat("a prompt of ", prompt.size(), " tokens and ", options.max_new_tokens,
               " new ones take more than the ", decoder.max_seq(), " positions of the decoder"));
  decoder.Reset();
  std::vector<int32_t> out;
  ASSIGN_OR_RETURN(std::span<const float> logits, decoder.Append(prompt));
  while (true) {
    if (on_logits) on_logits(logits);
    const int32_t next = SampleToken(logits, options, rng);
    out.push_back(next);
    if (std::find(eos.begin(), eos.end(), next) != eos.end() ||
        static_cast<int>(out.size()) >= options.max_new_tokens)
      return out;
    ASSIGN_OR_RETURN(logits, decoder.Append(std::span<const int32_t>(&out.back(), 1)));
  }
}

absl::StatusOr<std::vector<std::vector<int32_t>>> GenerateAll(
    const LlamaWeights& weights, const Adapter* adapter,
    const std::vector<std::vector<int32_t>>& prompts, std::span<const int32_t> eos,
    const SamplingOptions& options, uint64_t seed, int threads) {
  const int limit = weights.config().max_position_embeddings;
  size_t longest = 1;
  for (size_t i = 0; i < prompts.size(); ++i) {
    longest = std::max(longest, prompts[i].size());
    if (static_cast<int64_t>(prompts[i].size()) + options.max_new_tokens > limit)
      return absl::InvalidArgumentError(
          StrCat("prompt ", i + 1, ": ", prompts[i].size(), " tokens and ", options.max_new_tokens,
                 " new ones exceed the model's ", limit, " positions"));
  }
  // One decoder per part: prompts are independent. The cores left over (fewer prompts than cores)
  // go to each decoder's own threads.
  const size_t cores = threads > 0 ? threads : std::max(1u, std::thread::hardware_concurrency());
  const size_t parts = std::max<size_t>(1, std::min(prompts.size(), cores));
  const int per_decoder = static_cast<int>(cores / parts);
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<absl::Status> failed(parts);
  ParallelFor(
      parts,
      [&](size_t part) {
        auto decoder = Decoder::Create(
            &weights, adapter, static_cast<int>(longest) + options.max_new_tokens, per_decoder);
        if (!decoder.ok()) {
          failed[part] = decoder.status();
          return;
        }
        for (size_t i = prompts.size() * part / parts; i < prompts.size() * (part + 1) / parts;
             ++i) {
          std::mt19937_64 rng(seed + i);
          auto ids = Generate(**decoder, prompts[i], eos, options, rng);
          if (!ids.ok()) {
            failed[part] = ids.status();
            return;
          }
          out[i] = std::move(*ids);
        }
      },
      parts);
  for (const absl::Status& s : failed) RETURN_IF_ERROR(s);
  return out;
}

}  // namespace fedlora::common
