#include "client/regression_workload.h"

#include <random>

#include "common/blob.h"
#include "common/safetensors.h"
#include "common/strings.h"

namespace fedlora::client {
namespace {

using common::MatrixD;

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
  metrics.set_loss_after(
      Descend(adapter, task.settings().local_steps(), task.settings().learning_rate()));
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
