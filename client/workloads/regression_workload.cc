#include "client/workloads/regression_workload.h"

#include <random>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/privacy/private_sketch.h"
#include "common/tensor/blob.h"
#include "common/tensor/safetensors.h"

namespace fedlora::client {
namespace {

using common::MatrixD;
using common::StrCat;

MatrixD Gaussian(int rows, int cols, double stddev, std::mt19937_64& rng) {
  std::normal_distribution<double> normal(0.0, stddev);
  MatrixD x(rows, cols);
  for (double& v : x.reshaped()) v = normal(rng);
  return x;
}

std::string ModuleName(int layer) {
  return common::StrCat("model.layers.", layer, ".self_attn.q_proj");
}

}  // namespace

RegressionWorkload::RegressionWorkload(const RegressionOptions& o) : options_(o) {
  if (options_.privacy.enabled() && options_.privacy.dp.sample_rate <= 0)
    options_.privacy.dp.sample_rate = 0.1;
  const int n = o.in_features, m = o.out_features;
  std::mt19937_64 base_rng(o.base_seed), data_rng(o.data_seed * 7919 + 17);
  std::string weights;
  for (int l = 0; l < o.layers; ++l) {
    MatrixD w0 = Gaussian(m, n, 1.0 / std::sqrt(n), base_rng);
    const MatrixD shared =
        Gaussian(m, 4, 0.5, base_rng) * Gaussian(4, n, 1.0 / std::sqrt(n), base_rng);
    const MatrixD own = o.heterogeneity * Gaussian(m, 2, 0.5, data_rng) *
                        Gaussian(2, n, 1.0 / std::sqrt(n), data_rng);
    const Eigen::RowVectorXd mean = Gaussian(1, n, 0.5 * o.heterogeneity, data_rng);
    std::uniform_real_distribution<double> scale(0.5, 1.5);
    Eigen::VectorXd d(n);
    for (double& v : d) v = scale(data_rng);
    MatrixD x = Gaussian(static_cast<int>(o.examples), n, 1.0, data_rng) * d.asDiagonal();
    x.rowwise() += mean;
    MatrixD y = x * (w0 + shared + own).transpose() +
                Gaussian(static_cast<int>(o.examples), m, 0.01, data_rng);
    const Eigen::MatrixXf w0f = w0.cast<float>();
    weights.append(reinterpret_cast<const char*>(w0f.data()), static_cast<size_t>(w0f.size()) * 4);
    base_.push_back(std::move(w0));
    inputs_.push_back(std::move(x));
    targets_.push_back(std::move(y));
  }
  fingerprint_ = common::Sha256Hex(weights);
}

std::vector<v1::ModuleSpec> RegressionWorkload::modules() const {
  std::vector<v1::ModuleSpec> out;
  for (int l = 0; l < options_.layers; ++l) {
    v1::ModuleSpec s;
    s.set_name(ModuleName(l));
    s.set_in_features(options_.in_features);
    s.set_out_features(options_.out_features);
    out.push_back(std::move(s));
  }
  return out;
}

absl::StatusOr<size_t> RegressionWorkload::LayerOf(const std::string& name) const {
  for (int l = 0; l < options_.layers; ++l)
    if (ModuleName(l) == name) return static_cast<size_t>(l);
  return absl::InvalidArgumentError(StrCat("the regression workload has no module ", name));
}

absl::StatusOr<MatrixD> RegressionWorkload::BaseGradient(const std::string& name) const {
  ASSIGN_OR_RETURN(const size_t l, LayerOf(name));
  MatrixD g;
  Gradient(common::Adapter(), l, &g);
  return g;
}

absl::StatusOr<std::vector<MatrixD>> RegressionWorkload::Sketch(const v1::Task& task,
                                                                common::SketchStep step,
                                                                const std::vector<MatrixD>& bases) {
  if (bases.size() != static_cast<size_t>(task.modules_size())) {
    return absl::InvalidArgumentError(
        StrCat(bases.size(), " sketch bases for ", task.modules_size(), " modules"));
  }
  std::vector<MatrixD> out;
  if (!options_.privacy.enabled()) {
    for (int i = 0; i < task.modules_size(); ++i) {
      ASSIGN_OR_RETURN(MatrixD g, BaseGradient(task.modules(i).name()));
      out.push_back(common::SketchProduct(step, g, bases[static_cast<size_t>(i)]));
    }
    return out;
  }
  // DP-SGD (common/privacy/private_sketch.h): example e's gradient of layer l is u_e·x_eᵀ with
  // u_e = 2·r_e/m, of norm ‖u_e‖·‖x_e‖; clipped flat over the layers, noised once, counted as one
  // step at q = 1.
  const common::TrainOptions::DpSgd& dp = options_.privacy.dp;
  RETURN_IF_ERROR(common::CheckSketchBases(bases));
  ASSIGN_OR_RETURN(PrivacyLedger ledger, PrivacyLedger::Load(options_.privacy));
  RETURN_IF_ERROR(ledger.AdmitInitStep(task.round()));
  std::vector<size_t> layer;
  std::vector<MatrixD> u, record(static_cast<size_t>(task.modules_size()));
  for (int i = 0; i < task.modules_size(); ++i) {
    ASSIGN_OR_RETURN(const size_t l, LayerOf(task.modules(i).name()));
    layer.push_back(l);
    const int m = static_cast<int>(base_[l].rows()), n = static_cast<int>(base_[l].cols());
    u.push_back((inputs_[l] * base_[l].transpose() - targets_[l]) * (2.0 / m));
    const common::SketchShape shape =
        common::SketchProductShape(step, m, n, static_cast<int>(bases[i].cols()));
    out.push_back(MatrixD::Zero(shape.rows, shape.cols));
  }
  for (Eigen::Index e = 0; e < options_.examples; ++e) {
    double norm_sq = 0;
    for (size_t i = 0; i < layer.size(); ++i) {
      const auto u_e = u[i].row(e), x_e = inputs_[layer[i]].row(e);
      norm_sq += u_e.squaredNorm() * x_e.squaredNorm();
      record[i] = common::SketchProduct(step, u_e.transpose() * x_e, bases[i]);
    }
    common::AddClippedRecord(record, std::sqrt(norm_sq), dp.clip, out);
  }
  ASSIGN_OR_RETURN(common::GaussianNoise noise, common::GaussianNoise::Secure());
  common::NoisyMean(out, options_.privacy.init_sigma() * dp.clip,
                    static_cast<double>(options_.examples), noise);
  RETURN_IF_ERROR(ledger.RecordInitStep(task.round()));
  return out;
}

double RegressionWorkload::Gradient(const common::Adapter& adapter, size_t layer,
                                    MatrixD* grad) const {
  MatrixD w = base_[layer];
  if (adapter.num_modules() > 0) {
    const size_t i = *adapter.FindModule(ModuleName(static_cast<int>(layer)));
    MatrixD b = adapter.B(i).cast<double>();
    if (adapter.module(i).has_r) b = b * adapter.R(i).cast<double>();
    w += adapter.module(i).scaling * b * adapter.A(i).cast<double>();
  }
  const MatrixD residual = inputs_[layer] * w.transpose() - targets_[layer];  // N×m
  const double count = static_cast<double>(residual.size());
  if (grad) *grad = (2.0 / count) * residual.transpose() * inputs_[layer];  // m×n
  return residual.squaredNorm() / count;
}

double RegressionWorkload::Loss(const common::Adapter& adapter) const {
  double loss = 0;
  for (size_t l = 0; l < base_.size(); ++l) loss += Gradient(adapter, l, nullptr) / base_.size();
  return loss;
}

double RegressionWorkload::Descend(common::Adapter& adapter, int steps, double lr) const {
  MatrixD g;
  for (int step = 0; step < steps; ++step) {
    for (size_t l = 0; l < base_.size(); ++l) {
      Gradient(adapter, l, &g);
      const size_t i = *adapter.FindModule(ModuleName(static_cast<int>(l)));
      const double s = adapter.module(i).scaling;
      const MatrixD a = adapter.A(i).cast<double>(), b = adapter.B(i).cast<double>();
      if (adapter.module(i).has_r) {
        // W = W0 + s·B·R·A, only R trains: ∂L/∂R = s·Bᵀ·G·Aᵀ.
        adapter.R(i) -= (lr * s * b.transpose() * g * a.transpose()).cast<float>();
      } else {
        // ∂L/∂A = s·Bᵀ·G, ∂L/∂B = s·G·Aᵀ (both from the same point).
        adapter.A(i) -= (lr * s * b.transpose() * g).cast<float>();
        adapter.B(i) -= (lr * s * g * a.transpose()).cast<float>();
      }
    }
  }
  return Loss(adapter);
}

double RegressionWorkload::DescendPrivately(common::Adapter& adapter, int steps, double lr,
                                            common::GaussianNoise& noise,
                                            std::mt19937_64& sampler) const {
  const common::TrainOptions::DpSgd& dp = options_.privacy.dp;
  const double q = dp.sample_rate;
  const double expected = q * static_cast<double>(options_.examples);
  std::bernoulli_distribution pick(q);
  std::vector<Eigen::Index> sample;
  // Example i's loss is Σ_l ‖r_i‖²/m over the layers (Descend steps each layer on its own mean), so
  // per layer, over the sampled rows: U = ∂ℓ_i/∂ŷ_i (rows u_i = 2 r_i/m), P = U·B (rows Bᵀu_i),
  // Q = X·Aᵀ (rows A·x_i). Example i's gradient of layer l is the outer product u_i x_iᵀ through
  // the factors: A: s·Bᵀu_i x_iᵀ, B: s·u_i (A x_i)ᵀ, R: s·Bᵀu_i (A x_i)ᵀ, whose norms are products.
  std::vector<MatrixD> x(base_.size()), u(base_.size()), p(base_.size()), qa(base_.size());
  for (int step = 0; step < steps; ++step) {
    sample.clear();
    for (Eigen::Index i = 0; i < options_.examples; ++i)
      if (pick(sampler)) sample.push_back(i);
    const Eigen::Index k = static_cast<Eigen::Index>(sample.size());
    Eigen::VectorXd norm_sq = Eigen::VectorXd::Zero(k);
    for (size_t l = 0; l < base_.size(); ++l) {
      const size_t i = *adapter.FindModule(ModuleName(static_cast<int>(l)));
      const double s = adapter.module(i).scaling;
      MatrixD b = adapter.B(i).cast<double>();
      if (adapter.module(i).has_r) b = b * adapter.R(i).cast<double>();
      const MatrixD w = base_[l] + s * b * adapter.A(i).cast<double>();
      x[l] = inputs_[l](sample, Eigen::placeholders::all);
      u[l] = (x[l] * w.transpose() - targets_[l](sample, Eigen::placeholders::all)) *
             (2.0 / static_cast<double>(w.rows()));
      p[l] = u[l] * adapter.B(i).cast<double>();
      qa[l] = x[l] * adapter.A(i).cast<double>().transpose();
      const Eigen::VectorXd pn = p[l].rowwise().squaredNorm(), qn = qa[l].rowwise().squaredNorm();
      if (adapter.module(i).has_r) {
        norm_sq += s * s * pn.cwiseProduct(qn);
      } else {
        norm_sq += s * s *
                   (pn.cwiseProduct(x[l].rowwise().squaredNorm()) +
                    u[l].rowwise().squaredNorm().cwiseProduct(qn));
      }
    }
    const Eigen::VectorXd factor =
        norm_sq.unaryExpr([&](double n2) { return common::ClipFactor(std::sqrt(n2), dp.clip); });
    auto noised_mean = [&](MatrixD sum) {
      common::NoisyMean(std::span<double>(sum.data(), static_cast<size_t>(sum.size())),
                        dp.noise_multiplier * dp.clip, expected, noise);
      return sum;
    };
    for (size_t l = 0; l < base_.size(); ++l) {
      const size_t i = *adapter.FindModule(ModuleName(static_cast<int>(l)));
      const double s = adapter.module(i).scaling;
      const MatrixD pf = factor.asDiagonal() * p[l];
      if (adapter.module(i).has_r) {
        adapter.R(i) -= (lr * noised_mean(s * pf.transpose() * qa[l])).cast<float>();
      } else {
        const MatrixD ga = noised_mean(s * pf.transpose() * x[l]);
        const MatrixD gb = noised_mean(s * (factor.asDiagonal() * u[l]).transpose() * qa[l]);
        adapter.A(i) -= (lr * ga).cast<float>();
        adapter.B(i) -= (lr * gb).cast<float>();
      }
    }
  }
  return Loss(adapter);
}

absl::Status RegressionWorkload::MergeIntoBase(const common::Adapter& delta) {
  for (size_t l = 0; l < base_.size(); ++l) {
    const size_t i = *delta.FindModule(ModuleName(static_cast<int>(l)));
    base_[l] += delta.module(i).scaling * delta.B(i).cast<double>() * delta.A(i).cast<double>();
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::TrainMetrics> RegressionWorkload::Train(const v1::Task& task,
                                                           common::Adapter& adapter) {
  v1::TrainMetrics metrics;
  metrics.set_loss_before(Loss(adapter));
  const int steps = task.settings().local_steps();
  if (!options_.privacy.enabled()) {
    metrics.set_loss_after(Descend(adapter, steps, task.settings().learning_rate()));
  } else {
    const double q = options_.privacy.dp.sample_rate;
    ASSIGN_OR_RETURN(PrivacyLedger ledger, PrivacyLedger::Load(options_.privacy));
    RETURN_IF_ERROR(ledger.Admit(task.round(), q, steps));
    ASSIGN_OR_RETURN(common::GaussianNoise noise, common::GaussianNoise::Secure());
    ASSIGN_OR_RETURN(const uint64_t seed, common::SecureSeed());
    std::mt19937_64 sampler(seed);
    metrics.set_loss_after(
        DescendPrivately(adapter, steps, task.settings().learning_rate(), noise, sampler));
    RETURN_IF_ERROR(ledger.Record(task.round(), q, steps, metrics));
  }
  metrics.set_steps(task.settings().local_steps());
  return metrics;
}

absl::Status RegressionWorkload::WriteFinalState(const std::filesystem::path& dir) const {
  std::vector<common::MatrixF> rows;  // row-major f32, as PyTorch stores weights
  std::vector<common::TensorToWrite> tensors;
  for (const MatrixD& w : base_) rows.push_back(w.cast<float>());
  for (size_t l = 0; l < rows.size(); ++l) {
    tensors.push_back(
        {common::StrCat(ModuleName(static_cast<int>(l)), ".weight"),
         {rows[l].rows(), rows[l].cols()},
         std::span<const float>(rows[l].data(), static_cast<size_t>(rows[l].size()))});
  }
  return common::WriteSafetensors(dir / "base.safetensors", tensors, common::DType::kF32,
                                  {{"format", "pt"}});
}

}  // namespace fedlora::client
