// The `regression` workload: each client fits LoRA factors (or LoRA-SB's R) of linear layers y =
// W·x on its own synthetic data — a real least-squares optimisation whose centralised optimum is
// known, so tests and demos can see what each method converges to.
//
// The "base model" is `layers` matrices W0 (m×n) drawn from the base seed; its fingerprint is the
// sha256 of their f32 bytes. Client data (from the data seed) is non-IID: inputs x ~ N(μ_k,
// diag(d_k)²) with a client-specific mean and scale, targets y = (W0 + ΔW + ΔW_k)·x + 0.01·ε with a
// shared low-rank ΔW (from the base seed) and a client-specific low-rank ΔW_k scaled by
// `heterogeneity`. The loss is the mean over examples and outputs of (ŷ − y)², and training is
// full-batch gradient descent.
#ifndef FEDLORA_CLIENT_WORKLOADS_REGRESSION_WORKLOAD_H_
#define FEDLORA_CLIENT_WORKLOADS_REGRESSION_WORKLOAD_H_

#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/privacy_ledger.h"
#include "client/workloads/workload.h"
#include "common/privacy/dp.h"
#include "common/tensor/adapter.h"
#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::client {

struct RegressionOptions {
  uint64_t base_seed = 7;  // the base model (and the shared target); all clients of a run share it
  uint64_t data_seed = 1;  // this client's data
  int layers = 2;
  int in_features = 32;   // n
  int out_features = 32;  // m
  int64_t examples = 256;
  double heterogeneity = 1.0;  // size of the client-specific part of the target
  // DP-SGD instead of full-batch descent: each step a Poisson sample at rate q (default 0.1), each
  // example's gradient of the trained factors over all layers clipped flat to C, noise N(0, (σC)²)
  // on the sum, divided by the expected sample q·N.
  DpSgdSettings privacy;
};

class RegressionWorkload final : public Workload {
 public:
  explicit RegressionWorkload(const RegressionOptions& options);

  std::string fingerprint() const override { return fingerprint_; }
  int64_t num_examples() const override { return options_.examples; }
  std::vector<v1::ModuleSpec> modules() const override;
  // Full-batch gradient descent for the task's local_steps at its learning_rate.
  absl::StatusOr<v1::TrainMetrics> Train(const v1::Task& task, common::Adapter& adapter) override;
  // The closed-form gradient of the loss over all the client's examples at W_base (the loss is
  // full-batch), applied to the bases; with DP-SGD, example by example, clipped and noised, one
  // step at q = 1 in the privacy ledger.
  absl::StatusOr<std::vector<common::MatrixD>> Sketch(
      const v1::Task& task, common::SketchStep step,
      const std::vector<common::MatrixD>& bases) override;
  // ∂L/∂W at W_base for the module named `name` (m×n).
  absl::StatusOr<common::MatrixD> BaseGradient(const std::string& name) const;
  absl::StatusOr<size_t> LayerOf(const std::string& module) const;
  absl::Status MergeIntoBase(const common::Adapter& delta) override;
  // base.safetensors: W_base per layer (W0 plus every merged FLoRA delta).
  absl::Status WriteFinalState(const std::filesystem::path& dir) const override;

  // Mean squared error of W_base + s·B·A (or s·B·R·A) on this client's data; `adapter` may be empty
  // (base only).
  double Loss(const common::Adapter& adapter) const;
  // `steps` of gradient descent on A and B (or on R only, for has_r modules), in place; returns the
  // final loss.
  double Descend(common::Adapter& adapter, int steps, double learning_rate) const;
  // `steps` of DP-SGD (options().privacy) in place, with noise and sampling from `noise` and
  // `sampler`; returns the final loss.
  double DescendPrivately(common::Adapter& adapter, int steps, double learning_rate,
                          common::GaussianNoise& noise, std::mt19937_64& sampler) const;
  const std::vector<common::MatrixD>& base() const { return base_; }

 private:
  // ∂L/∂W_eff for layer l at the adapter's current value (m×n), and the loss.
  double Gradient(const common::Adapter& adapter, size_t layer, common::MatrixD* grad) const;

  RegressionOptions options_;
  std::string fingerprint_;
  std::vector<common::MatrixD> base_;     // W_base per layer, m×n (W0 plus merged FLoRA deltas)
  std::vector<common::MatrixD> inputs_;   // X per layer, N×n
  std::vector<common::MatrixD> targets_;  // Y per layer, N×m
};

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_WORKLOADS_REGRESSION_WORKLOAD_H_
