#include "common/llm/decoder.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "common/base/parallel.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/workspace.h"
#include "common/tensor/eigen_types.h"
#include "common/tensor/gemm.h"

namespace fedlora::common {

class Decoder::Impl {
 public:
  Impl(const LlamaWeights* w, const Adapter* adapter, int max_seq)
      : w_(*w), c_(w->config()), adapter_(adapter), max_seq_(max_seq) {}

  absl::Status Init() {
    openblas_set_num_threads(1);  // OpenBLAS's threads would change the products' bits (llama.h)
    if (max_seq_ < 1 || max_seq_ > c_.max_position_embeddings)
      return absl::InvalidArgumentError(StrCat("a decoder of ", max_seq_,
                                               " positions; the model takes 1 to ",
                                               c_.max_position_embeddings));
    slot_module_.assign(static_cast<size_t>(c_.num_hidden_layers) * kNumLinearKinds, -1);
    if (adapter_ != nullptr) {
      ASSIGN_OR_RETURN(std::vector<size_t> slots, AdapterSlots(c_, *adapter_));
      for (size_t i = 0; i < slots.size(); ++i) slot_module_[slots[i]] = static_cast<int>(i);
    }
    const int64_t KV = c_.kv_dim();
    k_cache_.assign(static_cast<size_t>(c_.num_hidden_layers) * max_seq_ * KV, 0.0f);
    v_cache_.assign(k_cache_.size(), 0.0f);
    // Within max_position_embeddings every rope type's frequencies are those of any length.
    RopeTables(c_, max_seq_, max_seq_, cos_, sin_);
    logits_.resize(static_cast<size_t>(c_.vocab_size));
    return absl::OkStatus();
  }

  absl::StatusOr<std::span<const float>> Append(std::span<const int32_t> ids);

  int length_ = 0;
  int max_seq() const { return max_seq_; }

 private:
  // y = x·Wᵀ (+ bias) (+ s·B·(R)·A·x) for m rows.
  void Linear(int l, LinearKind k, const float* x, float* y, int64_t m);
  // y = x·rms(x)·g over rows of `width`, the sum of squares in double as LlamaRunner does.
  void RmsNorm(const float* x, const float* g, float* y, int64_t rows, int width) const;
  // rotate_half rotary embedding of `heads` heads per row, row i at position first + i.
  void Rope(float* x, int64_t m, int heads, int first) const;

  const LlamaWeights& w_;
  const LlamaConfig& c_;
  const Adapter* adapter_;
  const int max_seq_;
  std::vector<int> slot_module_;     // adapter module per l·7 + kind, or -1
  AlignedFloats k_cache_, v_cache_;  // [L, max_seq, KV], after RoPE (keys)
  std::vector<float> cos_, sin_;     // [max_seq, D/2]
  AlignedFloats x_, h_, q_, k_, v_, att_, gate_, up_, scores_, u_, u2_, logits_;
};

void Decoder::Impl::Linear(int l, LinearKind k, const float* x, float* y, int64_t m) {
  const int64_t in = LinearIn(c_, k), out = LinearOut(c_, k);
  Gemm(false, true, m, out, in, 1.0f, x, in, w_.linear(l, k), in, 0.0f, y, out);
  if (const float* bias = w_.bias(l, k))
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < out; ++j) y[i * out + j] += bias[j];
  const int module = slot_module_[static_cast<size_t>(l) * kNumLinearKinds + static_cast<int>(k)];
  if (module < 0) return;
  const LoraModule& mo = adapter_->module(static_cast<size_t>(module));
  const float* values = adapter_->values().data();
  const int64_t r = mo.rank;
  u_.resize(static_cast<size_t>(m * r));
  Gemm(false, true, m, r, in, 1.0f, x, in, values + mo.a_offset, in, 0.0f, u_.data(), r);
  const float* u = u_.data();
  if (mo.has_r) {
    u2_.resize(u_.size());
    Gemm(false, true, m, r, r, 1.0f, u, r, values + mo.r_offset, r, 0.0f, u2_.data(), r);
    u = u2_.data();
  }
  Gemm(false, true, m, out, r, static_cast<float>(mo.scaling), u, r, values + mo.b_offset, r, 1.0f,
       y, out);
}

void Decoder::Impl::RmsNorm(const float* x, const float* g, float* y, int64_t rows,
                            int width) const {
  for (int64_t n = 0; n < rows; ++n) {
    const float* xr = x + n * width;
    double ss = 0;
    for (int j = 0; j < width; ++j) ss += static_cast<double>(xr[j]) * xr[j];
    const float inv = static_cast<float>(1.0 / std::sqrt(ss / width + c_.rms_norm_eps));
    for (int j = 0; j < width; ++j) y[n * width + j] = xr[j] * inv * g[j];
  }
}

void Decoder::Impl::Rope(float* x, int64_t m, int heads, int first) const {
  const int D = c_.head_dim, half = D / 2;
  for (int64_t i = 0; i < m; ++i) {
    const float* cs = cos_.data() + (first + i) * half;
    const float* sn = sin_.data() + (first + i) * half;
    for (int h = 0; h < heads; ++h) {
      float* xh = x + (i * heads + h) * D;
      for (int j = 0; j < half; ++j) {
        const float x1 = xh[j], x2 = xh[j + half];
        xh[j] = x1 * cs[j] - x2 * sn[j];
        xh[j + half] = x2 * cs[j] + x1 * sn[j];
      }
    }
  }
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
  const int H = c_.hidden_size, I = c_.intermediate_size, D = c_.head_dim;
  const int Hq = c_.num_attention_heads, Hkv = c_.num_key_value_heads, group = Hq / Hkv;
  const int Q = c_.q_dim(), KV = c_.kv_dim(), first = length_, end = length_ + static_cast<int>(m);
  const float inv_sqrt_d = 1.0f / std::sqrt(static_cast<float>(D));
  x_.resize(static_cast<size_t>(m * H));
  h_.resize(x_.size());
  q_.resize(static_cast<size_t>(m * Q));
  att_.resize(q_.size());
  k_.resize(static_cast<size_t>(m * KV));
  v_.resize(k_.size());
  gate_.resize(static_cast<size_t>(m * I));
  up_.resize(gate_.size());
  scores_.resize(static_cast<size_t>(m * end));
  for (int64_t i = 0; i < m; ++i)
    std::copy_n(w_.embed() + static_cast<int64_t>(ids[static_cast<size_t>(i)]) * H, H,
                x_.data() + i * H);

  for (int l = 0; l < c_.num_hidden_layers; ++l) {
    RmsNorm(x_.data(), w_.input_norm(l), h_.data(), m, H);
    Linear(l, LinearKind::kQ, h_.data(), q_.data(), m);
    Linear(l, LinearKind::kK, h_.data(), k_.data(), m);
    Linear(l, LinearKind::kV, h_.data(), v_.data(), m);
    if (c_.qk_norm) {  // in place: each row of a head is read whole before it is written
      RmsNorm(q_.data(), w_.q_norm(l), q_.data(), m * Hq, D);
      RmsNorm(k_.data(), w_.k_norm(l), k_.data(), m * Hkv, D);
    }
    Rope(q_.data(), m, Hq, first);
    Rope(k_.data(), m, Hkv, first);
    float* K = k_cache_.data() + static_cast<int64_t>(l) * max_seq_ * KV;
    float* V = v_cache_.data() + static_cast<int64_t>(l) * max_seq_ * KV;
    std::copy(k_.begin(), k_.end(), K + static_cast<int64_t>(first) * KV);
    std::copy(v_.begin(), v_.end(), V + static_cast<int64_t>(first) * KV);
    const int window = c_.window(l);
    for (int h = 0; h < Hq; ++h) {
      const int g = h / group;
      // S = Q_h·K_gᵀ/√D over every cached position, then each row's causal window.
      Gemm(false, true, m, end, D, inv_sqrt_d, q_.data() + h * D, Q, K + g * D, KV, 0.0f,
           scores_.data(), end);
      for (int64_t i = 0; i < m; ++i) {
        const int pos = first + static_cast<int>(i);
        const int lo = window > 0 ? std::max(0, pos - window + 1) : 0;
        float* row = scores_.data() + i * end;
        Eigen::Map<Eigen::ArrayXf> live(row + lo, pos + 1 - lo);
        live = (live - live.maxCoeff()).exp();
        live /= live.sum();
        std::fill(row, row + lo, 0.0f);
        std::fill(row + pos + 1, row + end, 0.0f);
      }
      Gemm(false, false, m, D, end, 1.0f, scores_.data(), end, V + g * D, KV, 0.0f,
           att_.data() + h * D, Q);
    }
    Linear(l, LinearKind::kO, att_.data(), h_.data(), m);
    for (size_t i = 0; i < x_.size(); ++i) x_[i] += h_[i];
    RmsNorm(x_.data(), w_.post_norm(l), h_.data(), m, H);
    Linear(l, LinearKind::kGate, h_.data(), gate_.data(), m);
    Linear(l, LinearKind::kUp, h_.data(), up_.data(), m);
    for (size_t i = 0; i < gate_.size(); ++i)
      gate_[i] = gate_[i] / (1.0f + std::exp(-gate_[i])) * up_[i];
    Linear(l, LinearKind::kDown, gate_.data(), h_.data(), m);
    for (size_t i = 0; i < x_.size(); ++i) x_[i] += h_[i];
  }
  length_ = end;
  RmsNorm(x_.data() + (m - 1) * H, w_.final_norm(), h_.data(), 1, H);
  Gemm(false, true, 1, c_.vocab_size, H, 1.0f, h_.data(), H, w_.lm_head(), H, 0.0f, logits_.data(),
       c_.vocab_size);
  return std::span<const float>(logits_);
}

Decoder::Decoder(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Decoder::~Decoder() = default;

absl::StatusOr<std::unique_ptr<Decoder>> Decoder::Create(const LlamaWeights* weights,
                                                         const Adapter* adapter, int max_seq) {
  auto impl = std::make_unique<Impl>(weights, adapter, max_seq);
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
  // One decoder per part: prompts are independent.
  const size_t cores = threads > 0 ? threads : std::max(1u, std::thread::hardware_concurrency());
  const size_t parts = std::max<size_t>(1, std::min(prompts.size(), cores));
  std::vector<std::vector<int32_t>> out(prompts.size());
  std::vector<absl::Status> failed(parts);
  ParallelFor(
      parts,
      [&](size_t part) {
        auto decoder =
            Decoder::Create(&weights, adapter, static_cast<int>(longest) + options.max_new_tokens);
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
