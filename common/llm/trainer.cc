#include "common/llm/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>
#include <numbers>
#include <random>

#include "absl/status/status.h"
#include "common/base/parallel.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/llm/adamw.h"
#include "common/privacy/dp.h"
#include "common/privacy/private_sketch.h"
#include "common/tensor/blob.h"
#include "common/tensor/linalg.h"
#include "common/tensor/peft.h"

namespace fedlora::common {
namespace {

int LongestExample(const std::vector<Example>& examples) {
  size_t longest = 2;
  for (const Example& e : examples) longest = std::max(longest, e.input_ids.size());
  return static_cast<int>(longest);
}

void ZeroRanges(const ParameterRanges& ranges, std::vector<float>& v) {
  for (const auto& [b, e] : ranges) std::fill(v.begin() + b, v.begin() + e, 0.0f);
}

double SquaredNorm(const ParameterRanges& ranges, const std::vector<float>& v) {
  double sum = 0;
  for (const auto& [b, e] : ranges)
    for (size_t i = b; i < e; ++i) sum += static_cast<double>(v[i]) * v[i];
  return sum;
}

// [begin, end) ranges of the adapter's buffer that training updates.
ParameterRanges TrainableRanges(const Adapter& adapter) {
  ParameterRanges ranges;
  for (const LoraModule& m : adapter.modules()) {
    if (m.has_r)
      ranges.push_back({m.r_offset, m.r_offset + static_cast<size_t>(m.rank) * m.rank});
    else  // A then B, back to back
      ranges.push_back({m.a_offset, m.b_offset + static_cast<size_t>(m.out_features) * m.rank});
  }
  return ranges;
}

// What one step's gradient pass saw.
struct StepGradient {
  LossSum loss;
  int64_t tokens = 0;  // input tokens (padding excluded)
  int64_t examples = 0;
};

// Where a step's gradient comes from: Next sets `grads` (on `ranges`) to the next step's.
class GradientSource {
 public:
  virtual ~GradientSource() = default;
  virtual absl::StatusOr<StepGradient> Next(LlamaRunner& runner, const ParameterRanges& ranges,
                                            std::vector<float>& grads) = 0;
};

// Mini-batch steps: grad_accum micro-batches of `batch` examples from a shuffled order (shuffled
// again at each epoch), and the gradient of the mean loss over all their target tokens.
class MiniBatches final : public GradientSource {
 public:
  MiniBatches(const std::vector<Example>& examples, const TrainOptions& o)
      : examples_(examples), batch_(o.batch), rng_(o.seed), micro_(o.grad_accum) {
    order_.resize(examples.size());
    for (size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    std::shuffle(order_.begin(), order_.end(), rng_);
    for (TokenBatch& b : micro_) {  // the largest batch, so that no step allocates
      b.input_ids.reserve(static_cast<size_t>(o.batch) * LongestExample(examples));
      b.labels.reserve(b.input_ids.capacity());
    }
  }

  absl::StatusOr<StepGradient> Next(LlamaRunner& runner, const ParameterRanges& ranges,
                                    std::vector<float>& grads) override {
    StepGradient out;
    int64_t targets = 0;
    for (TokenBatch& micro : micro_) {
      if (cursor_ == order_.size()) {  // next epoch
        std::shuffle(order_.begin(), order_.end(), rng_);
        cursor_ = 0;
      }
      const size_t count = std::min(static_cast<size_t>(batch_), order_.size() - cursor_);
      FillBatch(examples_, order_, cursor_, count, 0, micro);
      for (size_t i = cursor_; i < cursor_ + count; ++i)
        out.tokens += static_cast<int64_t>(examples_[order_[i]].input_ids.size());
      cursor_ += count;
      targets += micro.TargetCount();
      out.examples += static_cast<int64_t>(count);
    }
    ZeroRanges(ranges, grads);
    const float scale = targets > 0 ? 1.0f / static_cast<float>(targets) : 0.0f;
    for (const TokenBatch& micro : micro_) {
      ASSIGN_OR_RETURN(LossSum l, runner.ForwardBackward(micro, scale, grads));
      out.loss.sum += l.sum;
      out.loss.tokens += l.tokens;
    }
    return out;
  }

 private:
  const std::vector<Example>& examples_;
  const int batch_;
  std::vector<size_t> order_;
  size_t cursor_ = 0;
  std::mt19937_64 rng_;
  std::vector<TokenBatch> micro_;
};

// DP-SGD steps (TrainOptions::DpSgd): a Poisson sample at rate q, each sampled example's gradient
// of its mean token loss clipped flat to C, summed, and the noisy mean over the expected q·n.
class PrivateBatches final : public GradientSource {
 public:
  static absl::StatusOr<std::unique_ptr<PrivateBatches>> Create(
      const std::vector<Example>& examples, const TrainOptions::DpSgd& dp, double q,
      size_t parameters) {
    ASSIGN_OR_RETURN(GaussianNoise noise, GaussianNoise::SecureUnlessTesting(dp.test_seed));
    uint64_t seed = dp.test_seed;
    if (seed == 0) {
      ASSIGN_OR_RETURN(seed, SecureSeed());
    }
    return std::unique_ptr<PrivateBatches>(
        new PrivateBatches(examples, dp, q, parameters, std::move(noise), seed));
  }

  absl::StatusOr<StepGradient> Next(LlamaRunner& runner, const ParameterRanges& ranges,
                                    std::vector<float>& grads) override {
    StepGradient out;
    sampled_.clear();
    std::bernoulli_distribution pick(q_);
    for (size_t i = 0; i < examples_.size(); ++i)
      if (pick(sampler_)) sampled_.push_back(i);
    ZeroRanges(ranges, grads);
    for (size_t i : sampled_) {
      const int64_t n = TargetCount(examples_[i]);
      out.tokens += static_cast<int64_t>(examples_[i].input_ids.size());
      if (n == 0) continue;
      FillBatch(examples_, identity_, i, 1, 0, one_);
      ZeroRanges(ranges, sample_grad_);
      ASSIGN_OR_RETURN(LossSum l,
                       runner.ForwardBackward(one_, 1.0f / static_cast<float>(n), sample_grad_));
      out.loss.sum += l.sum;
      out.loss.tokens += l.tokens;
      const float factor =
          static_cast<float>(ClipFactor(std::sqrt(SquaredNorm(ranges, sample_grad_)), dp_.clip));
      for (const auto& [b, e] : ranges)
        for (size_t j = b; j < e; ++j) grads[j] += factor * sample_grad_[j];
    }
    out.examples = static_cast<int64_t>(sampled_.size());
    const double expected = q_ * static_cast<double>(examples_.size());
    for (const auto& [b, e] : ranges)
      NoisyMean(std::span<float>(grads.data() + b, e - b), dp_.noise_multiplier * dp_.clip,
                expected, noise_);
    return out;
  }

 private:
  PrivateBatches(const std::vector<Example>& examples, const TrainOptions::DpSgd& dp, double q,
                 size_t parameters, GaussianNoise noise, uint64_t seed)
      : examples_(examples),
        dp_(dp),
        q_(q),
        noise_(std::move(noise)),
        sampler_(seed),
        sample_grad_(parameters, 0.0f),
        identity_(examples.size()) {
    for (size_t i = 0; i < identity_.size(); ++i) identity_[i] = i;
    sampled_.reserve(examples.size());
    one_.input_ids.reserve(static_cast<size_t>(LongestExample(examples)));
    one_.labels.reserve(one_.input_ids.capacity());
  }

  const std::vector<Example>& examples_;
  const TrainOptions::DpSgd dp_;
  const double q_;
  GaussianNoise noise_;
  std::mt19937_64 sampler_;
  std::vector<float> sample_grad_;  // one example's gradient, in the adapter's layout
  std::vector<size_t> identity_, sampled_;
  TokenBatch one_;
};

absl::Status CheckTrainOptions(const TrainOptions& o, bool dp, double q) {
  if (o.batch <= 0 || o.grad_accum <= 0 || (o.steps <= 0 && !(o.epochs > 0)) || !(o.lr > 0) ||
      o.warmup_ratio < 0 || o.warmup_ratio >= 1 || o.max_grad_norm < 0)
    return absl::InvalidArgumentError(
        StrCat("training needs batch ≥ 1, grad_accum ≥ 1, steps or epochs > 0, lr > 0, ",
               "warmup_ratio in [0, 1) and max_grad_norm ≥ 0; got batch ", o.batch, ", grad_accum ",
               o.grad_accum, ", steps ", o.steps, ", epochs ", o.epochs, ", lr ", o.lr,
               ", warmup_ratio ", o.warmup_ratio, ", max_grad_norm ", o.max_grad_norm));
  if (dp && (!(o.dp.clip > 0) || q > 1))
    return absl::InvalidArgumentError(StrCat(
        "DP-SGD needs a clip norm > 0 and a sample rate in (0, 1]; got ", o.dp.clip, " and ", q));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Model> LoadModel(const std::filesystem::path& dir) {
  ASSIGN_OR_RETURN(LlamaWeights weights, LlamaWeights::Read(dir));
  Model model{std::move(weights), nullptr, {}, dir.string()};
  const LlamaConfig& c = model.weights.config();
  if (std::filesystem::exists(dir / kTokenizerFile)) {
    ASSIGN_OR_RETURN(Tokenizer tokenizer, Tokenizer::Read(dir));
    if (tokenizer.vocab_size() > c.vocab_size)
      return absl::InvalidArgumentError(StrCat(
          (dir / kTokenizerFile).string(), " has ids up to ", tokenizer.vocab_size() - 1,
          " but config.json's vocab_size is ", c.vocab_size, " (tokenizer of another model?)"));
    model.tokenizer = std::make_unique<Tokenizer>(std::move(tokenizer));
  }
  model.tokens = {model.tokenizer.get(), c.eos_token_ids.empty() ? -1 : c.eos_token_ids[0],
                  c.vocab_size};
  return model;
}

std::string WeightsFingerprint(const LlamaWeights& weights) {
  // Of the values as f32, whatever the type they are stored in.
  return Sha256Hex([&](const std::function<void(std::string_view)>& sink) {
    std::vector<float> chunk(1 << 16);
    for (const TensorToWrite& t : weights.Tensors())
      for (size_t i = 0; i < t.data.size(); i += chunk.size()) {
        const size_t n = std::min(chunk.size(), t.data.size() - i);
        t.data.subspan(i, n).ToF32(std::span(chunk).first(n));
        sink({reinterpret_cast<const char*>(chunk.data()), n * sizeof(float)});
      }
  });
}

double ScheduleFactor(Schedule schedule, int64_t step, int64_t total, int64_t warmup) {
  if (step < warmup)
    return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup));
  const double progress = static_cast<double>(step - warmup) /
                          static_cast<double>(std::max<int64_t>(1, total - warmup));
  switch (schedule) {
    case Schedule::kConstant:
      return 1.0;
    case Schedule::kLinear:
      return std::max(0.0, 1.0 - progress);
    case Schedule::kCosine:
      return std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
  }
  return 1.0;
}

absl::StatusOr<Adapter> NewAdapter(const LlamaConfig& config, const LoraSpec& spec, uint64_t seed,
                                   const std::string& base_model) {
  if (spec.rank <= 0 || spec.targets.empty() || !(spec.alpha > 0))
    return absl::InvalidArgumentError(
        StrCat("LoRA needs a positive rank and alpha and at least one target, got rank ", spec.rank,
               ", alpha ", spec.alpha, ", ", spec.targets.size(), " targets"));
  std::vector<ModuleShape> shapes;
  const double scaling = LoraScaling(spec.alpha, spec.rank, spec.use_rslora);
  for (int l = 0; l < config.num_hidden_layers; ++l)
    for (LinearKind k : spec.targets) {
      const int in = LinearIn(config, k), out = LinearOut(config, k);
      if (spec.rank > std::min(in, out))
        return absl::InvalidArgumentError(
            StrCat("rank ", spec.rank, " exceeds ", LinearName(k), "'s [", out, ", ", in, "]"));
      shapes.push_back({LinearPath(l, k), spec.rank, in, out, scaling, spec.lora_sb});
    }
  ASSIGN_OR_RETURN(Adapter adapter, Adapter::Create(shapes));
  adapter.base_model = base_model;
  if (!spec.lora_sb) {
    std::mt19937_64 rng(seed);
    for (size_t i = 0; i < adapter.num_modules(); ++i) InitLoraA(adapter.A(i), rng);
  }
  return adapter;
}

absl::Status InitLoraSb(const LlamaWeights& weights, const std::vector<Example>& examples,
                        double lr, int batch, int threads, Adapter& adapter) {
  const LlamaConfig& c = weights.config();
  ASSIGN_OR_RETURN(std::vector<size_t> slots, AdapterSlots(c, adapter));
  ASSIGN_OR_RETURN(auto runner, LlamaRunner::Create(&weights, nullptr,
                                                    {.max_batch = batch,
                                                     .max_seq = LongestExample(examples),
                                                     .training = true,
                                                     .threads = threads}));
  std::vector<MatrixF> grads(adapter.num_modules());
  std::vector<float*> dense(static_cast<size_t>(c.num_hidden_layers) * kNumLinearKinds, nullptr);
  for (size_t i = 0; i < adapter.num_modules(); ++i) {
    grads[i] = MatrixF::Zero(adapter.module(i).out_features, adapter.module(i).in_features);
    dense[slots[i]] = grads[i].data();
  }
  std::vector<size_t> order(examples.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  int64_t targets = 0;
  for (const Example& e : examples) targets += TargetCount(e);
  if (targets == 0)
    return absl::InvalidArgumentError("LoRA-SB initialisation data has no target tokens");
  for (size_t first = 0; first < examples.size(); first += static_cast<size_t>(batch)) {
    const size_t count = std::min(static_cast<size_t>(batch), examples.size() - first);
    RETURN_IF_ERROR(runner
                        ->WeightGradients(MakeBatch(examples, order, first, count, 0),
                                          1.0f / static_cast<float>(targets), dense)
                        .status());
  }
  ParallelFor(adapter.num_modules(), [&](size_t i) {
    const LoraModule& m = adapter.module(i);
    const MatrixF delta = grads[i].unaryExpr(
        [&](float g) { return static_cast<float>(-lr) * static_cast<float>((g > 0) - (g < 0)); });
    const Svd svd = ThinSvd(delta.cast<double>());
    adapter.B(i) = svd.u.leftCols(m.rank).cast<float>();
    adapter.A(i) = svd.v.leftCols(m.rank).transpose().cast<float>();
    adapter.R(i).setZero();
    adapter.R(i).diagonal() = (svd.s.head(m.rank) / m.scaling).cast<float>();
  });
  return absl::OkStatus();
}

absl::StatusOr<std::vector<MatrixD>> SketchGradients(const LlamaWeights& weights,
                                                     const std::vector<Example>& examples,
                                                     const Adapter& layout, SketchStep step,
                                                     const std::vector<MatrixD>& bases, int batch,
                                                     int threads, const TrainOptions::DpSgd& dp) {
  const LlamaConfig& c = weights.config();
  const bool private_sketch = dp.noise_multiplier >= 0;
  if (private_sketch) {
    if (!(dp.clip > 0))
      return absl::InvalidArgumentError(StrCat("DP-SGD needs a clip norm > 0; got ", dp.clip));
    RETURN_IF_ERROR(CheckSketchBases(bases));
  }
  ASSIGN_OR_RETURN(std::vector<size_t> slots, AdapterSlots(c, layout));
  if (bases.size() != layout.num_modules())
    return absl::InvalidArgumentError(
        StrCat(bases.size(), " sketch bases for ", layout.num_modules(), " modules"));
  std::vector<bool> wanted(static_cast<size_t>(c.num_hidden_layers) * kNumLinearKinds, false);
  std::vector<size_t> module_of(wanted.size());
  std::vector<MatrixF> basis(bases.size());
  std::vector<MatrixD> out(bases.size());
  for (size_t i = 0; i < bases.size(); ++i) {
    const LoraModule& m = layout.module(i);
    const int l = static_cast<int>(bases[i].cols());
    const SketchShape want = SketchBasisShape(step, static_cast<int>(m.out_features),
                                              static_cast<int>(m.in_features), l);
    if (bases[i].rows() != want.rows || (step != SketchStep::kDense && l < 1))
      return absl::InvalidArgumentError(StrCat(SketchStepName(step), " basis of ", m.name, " is ",
                                               bases[i].rows(), "×", l, ", expected ", want.rows,
                                               " rows"));
    const SketchShape shape = SketchProductShape(step, static_cast<int>(m.out_features),
                                                 static_cast<int>(m.in_features), l);
    out[i] = MatrixD::Zero(shape.rows, shape.cols);
    basis[i] = bases[i].cast<float>();
    wanted[slots[i]] = true;
    module_of[slots[i]] = i;
  }
  int64_t targets = 0;
  for (const Example& e : examples) targets += TargetCount(e);
  if (targets == 0) return absl::InvalidArgumentError("the sketch's data has no target tokens");
  ASSIGN_OR_RETURN(auto runner, LlamaRunner::Create(&weights, nullptr,
                                                    {.max_batch = batch,
                                                     .max_seq = LongestExample(examples),
                                                     .training = true,
                                                     .threads = threads}));
  // Without DP the products of every batch go straight into `out`; with DP, one example's go into
  // `record` with its squared gradient norm, and are clipped into `out` when it is done.
  std::vector<MatrixD> record;
  double record_norm_sq = 0;
  if (private_sketch) {
    for (const MatrixD& o : out) record.push_back(MatrixD::Zero(o.rows(), o.cols()));
  }
  std::vector<MatrixD>& into = private_sketch ? record : out;
  const auto sink = [&](const LlamaRunner::GradientRows& g) {
    const size_t i = module_of[LinearSlot(g.layer, g.kind)];
    const ConstMapF x(g.x, g.rows, LinearIn(c, g.kind)), dy(g.dy, g.rows, LinearOut(c, g.kind));
    if (private_sketch) {  // ‖dyᵀ·x‖_F² = Σ_st (dy_s·dy_t)(x_s·x_t), summed in double
      record_norm_sq +=
          (dy * dy.transpose()).cwiseProduct(x * x.transpose()).template cast<double>().sum();
    }
    switch (step) {
      case SketchStep::kRange:
      case SketchStep::kPower:  // G·basis = dyᵀ·(x·basis)
        into[i] += (dy.transpose() * (x * basis[i])).cast<double>();
        break;
      case SketchStep::kTransposed:  // Gᵀ·basis = xᵀ·(dy·basis)
        into[i] += (x.transpose() * (dy * basis[i])).cast<double>();
        break;
      case SketchStep::kProject:  // basisᵀ·G = (dy·basis)ᵀ·x
        into[i] += ((dy * basis[i]).transpose() * x).cast<double>();
        break;
      case SketchStep::kDense:  // G = dyᵀ·x
        into[i] += (dy.transpose() * x).cast<double>();
        break;
    }
  };
  std::vector<size_t> order(examples.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  if (!private_sketch) {
    for (size_t first = 0; first < examples.size(); first += static_cast<size_t>(batch)) {
      const size_t count = std::min(static_cast<size_t>(batch), examples.size() - first);
      RETURN_IF_ERROR(runner
                          ->WeightGradientRows(MakeBatch(examples, order, first, count, 0),
                                               1.0f / static_cast<float>(targets), wanted, sink)
                          .status());
    }
    return out;
  }
  for (size_t e = 0; e < examples.size(); ++e) {
    const int64_t n = TargetCount(examples[e]);
    if (n == 0) continue;  // no loss, no gradient: nothing to clip
    for (MatrixD& r : record) r.setZero();
    record_norm_sq = 0;
    RETURN_IF_ERROR(runner
                        ->WeightGradientRows(MakeBatch(examples, order, e, 1, 0),
                                             1.0f / static_cast<float>(n), wanted, sink)
                        .status());
    AddClippedRecord(record, std::sqrt(record_norm_sq), dp.clip, out);
  }
  ASSIGN_OR_RETURN(GaussianNoise noise, GaussianNoise::SecureUnlessTesting(dp.test_seed));
  NoisyMean(out, dp.noise_multiplier * dp.clip, static_cast<double>(examples.size()), noise);
  return out;
}

absl::StatusOr<TrainResult> Train(const LlamaWeights& weights, const std::vector<Example>& examples,
                                  const TrainOptions& o, Adapter& adapter,
                                  const std::function<void(const StepReport&)>& on_step) {
  if (examples.empty()) return absl::InvalidArgumentError("no training examples");
  const bool dp = o.dp.noise_multiplier >= 0;
  const double n = static_cast<double>(examples.size());
  const double q = !dp                    ? 0.0
                   : o.dp.sample_rate > 0 ? o.dp.sample_rate
                                          : std::min(1.0, static_cast<double>(o.batch) / n);
  RETURN_IF_ERROR(CheckTrainOptions(o, dp, q));
  ASSIGN_OR_RETURN(auto runner,
                   LlamaRunner::Create(&weights, &adapter,
                                       {.max_batch = dp ? 1 : o.batch,
                                        .max_seq = LongestExample(examples),
                                        .training = true,
                                        .checkpoint_activations = o.checkpoint_activations,
                                        .threads = o.threads}));
  std::span<float> params = adapter.values();
  std::unique_ptr<GradientSource> source;
  if (dp) {
    ASSIGN_OR_RETURN(source, PrivateBatches::Create(examples, o.dp, q, params.size()));
  } else {
    source = std::make_unique<MiniBatches>(examples, o);
  }
  const size_t per_step = static_cast<size_t>(o.batch) * o.grad_accum;
  const int64_t steps_per_epoch = static_cast<int64_t>((examples.size() + per_step - 1) / per_step);
  const int64_t total =
      o.steps > 0
          ? o.steps
          : std::max<int64_t>(1, static_cast<int64_t>(std::ceil(o.epochs * steps_per_epoch)));
  const int64_t warmup = static_cast<int64_t>(std::ceil(o.warmup_ratio * total));
  const ParameterRanges ranges = TrainableRanges(adapter);
  std::vector<float> grads(params.size(), 0.0f), m(params.size(), 0.0f), v(params.size(), 0.0f);
  const AdamWOptions adamw{o.beta1, o.beta2, o.adam_eps, o.weight_decay};

  TrainResult result;
  result.workspace_bytes = runner->workspace_bytes();
  const auto start = std::chrono::steady_clock::now();
  for (int64_t step = 0; step < total; ++step) {
    ASSIGN_OR_RETURN(const StepGradient g, source->Next(*runner, ranges, grads));
    const double norm = std::sqrt(SquaredNorm(ranges, grads));
    if (!std::isfinite(norm))
      return absl::InternalError(StrCat("gradient is not finite at step ", step + 1,
                                        " (learning rate ", o.lr,
                                        " too high?); training stopped before applying it"));
    const float clip = (!dp && o.max_grad_norm > 0 && norm > o.max_grad_norm)
                           ? static_cast<float>(o.max_grad_norm / (norm + 1e-6))
                           : 1.0f;
    const double lr = o.lr * ScheduleFactor(o.schedule, step, total, warmup);
    AdamWUpdate(params, grads, m, v, ranges, lr, step + 1, adamw, clip);
    const double step_loss =
        g.loss.tokens > 0 ? g.loss.sum / static_cast<double>(g.loss.tokens) : 0.0;
    if (step == 0) result.first_loss = step_loss;
    result.final_loss = step_loss;
    result.tokens += g.tokens;
    result.examples_seen += g.examples;
    result.steps = step + 1;
    result.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (on_step) on_step({step + 1, total, step_loss, lr, norm, g.tokens, result.seconds});
  }
  result.dp_sample_rate = q;
  return result;
}

absl::StatusOr<LossSum> Evaluate(const LlamaWeights& weights, const Adapter* adapter,
                                 const std::vector<Example>& examples, int batch, int threads) {
  if (examples.empty()) return absl::InvalidArgumentError("no evaluation examples");
  ASSIGN_OR_RETURN(auto runner, LlamaRunner::Create(&weights, adapter,
                                                    {.max_batch = batch,
                                                     .max_seq = LongestExample(examples),
                                                     .threads = threads}));
  std::vector<size_t> order(examples.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  LossSum total;
  for (size_t first = 0; first < examples.size(); first += static_cast<size_t>(batch)) {
    const size_t count = std::min(static_cast<size_t>(batch), examples.size() - first);
    ASSIGN_OR_RETURN(LossSum l, runner->Forward(MakeBatch(examples, order, first, count, 0)));
    total.sum += l.sum;
    total.tokens += l.tokens;
  }
  return total;
}

}  // namespace fedlora::common
