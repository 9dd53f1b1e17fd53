#include "common/privacy/client_dp.h"

#include <algorithm>
#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/linalg.h"

namespace fedlora::common {
namespace {

std::span<float> Span(MapF m) { return {m.data(), static_cast<size_t>(m.size())}; }

// `update`'s module named as `start`'s module i, with the same shape; scalings may differ.
absl::StatusOr<size_t> Matching(const Adapter& update, const Adapter& start, size_t i) {
  const LoraModule& want = start.module(i);
  const std::optional<size_t> j = update.FindModule(want.name);
  if (!j) return absl::InvalidArgumentError(StrCat("the update lacks module ", want.name));
  const LoraModule& got = update.module(*j);
  if (got.rank != want.rank || got.in_features != want.in_features ||
      got.out_features != want.out_features || got.has_r != want.has_r) {
    return absl::InvalidArgumentError(StrCat(
        "module ", want.name, " has rank ", got.rank, ", ", got.out_features, "x", got.in_features,
        got.has_r ? " with R" : "", "; the round's state has rank ", want.rank, ", ",
        want.out_features, "x", want.in_features, want.has_r ? " with R" : ""));
  }
  return *j;
}

}  // namespace

std::vector<std::span<float>> TrainableValues(Adapter& adapter) {
  std::vector<std::span<float>> out;
  for (size_t i = 0; i < adapter.num_modules(); ++i) {
    if (adapter.module(i).has_r) {
      out.push_back(Span(adapter.R(i)));
    } else {
      out.push_back(Span(adapter.A(i)));
      out.push_back(Span(adapter.B(i)));
    }
  }
  return out;
}

size_t TrainableCount(const Adapter& adapter) {
  size_t n = 0;
  for (size_t i = 0; i < adapter.num_modules(); ++i) {
    const LoraModule& m = adapter.module(i);
    n += static_cast<size_t>(m.has_r ? m.rank * m.rank : m.rank * (m.in_features + m.out_features));
  }
  return n;
}

absl::Status ChangeInto(const Adapter& update, const Adapter& start, std::span<float> out) {
  if (out.size() != TrainableCount(start))
    return absl::InvalidArgumentError(
        StrCat("a change of ", out.size(), " values; the state has ", TrainableCount(start)));
  size_t at = 0;
  auto put = [&](const auto& expr) {
    Eigen::Map<MatrixF>(out.data() + at, expr.rows(), expr.cols()) = expr;
    at += static_cast<size_t>(expr.size());
  };
  for (size_t i = 0; i < start.num_modules(); ++i) {
    ASSIGN_OR_RETURN(const size_t j, Matching(update, start, i));
    const float s = static_cast<float>(update.module(j).scaling);
    if (start.module(i).has_r) {
      put(s * update.R(j) - start.R(i));
    } else {
      put(update.A(j) - start.A(i));
      put(s * update.B(j) - start.B(i));
    }
  }
  return absl::OkStatus();
}

ClientDpRound::ClientDpRound(Adapter start, double clip, double expected_clients)
    : start_(std::move(start)), clip_(clip), expected_clients_(expected_clients) {
  const size_t n = TrainableCount(start_);
  sum_.assign(n, 0.0);
  delta_.resize(n);
}

absl::StatusOr<double> ClientDpRound::Add(const Adapter& update) {
  RETURN_IF_ERROR(ChangeInto(update, start_, delta_));
  const std::span<float> delta(delta_);
  const double norm = ClipFlatL2(std::span<const std::span<float>>(&delta, 1), clip_);
  for (size_t k = 0; k < sum_.size(); ++k) sum_[k] += delta_[k];
  norms_.push_back(norm);
  return norm;
}

Adapter ClientDpRound::Finish(double noise_multiplier, GaussianNoise& noise) const {
  std::vector<double> mean = sum_;
  NoisyMean(mean, noise_multiplier * clip_, expected_clients_, noise);
  Adapter out = start_;
  size_t k = 0;
  for (std::span<float> values : TrainableValues(out)) {
    for (float& x : values) x = static_cast<float>(x + mean[k++]);
  }
  for (size_t i = 0; i < out.num_modules(); ++i) out.set_scaling(i, 1.0);
  return out;
}

absl::StatusOr<std::vector<LoraFairSolution>> PrivateLoraFairCorrection(
    std::span<const Adapter> updates, const Adapter& start, Adapter& global, double clip,
    double noise_multiplier, double expected_clients, GaussianNoise& noise,
    const LoraFairOptions& options) {
  const size_t modules = global.num_modules();
  // Per module: Ā and B_0 A_0 Āᵀ; c_k's clip is S·max_i ‖Ā_i‖₂.
  std::vector<MatrixD> a_bar(modules), base(modules);
  double a_norm = 0;
  for (size_t i = 0; i < modules; ++i) {
    a_bar[i] = global.A(i).cast<double>();
    base[i] = ProjectedProduct(start, i, a_bar[i]);
    a_norm = std::max(a_norm, SpectralNorm(a_bar[i]));
  }
  const double clip_g = clip * a_norm;
  std::vector<MatrixD> sum(modules);
  for (size_t i = 0; i < modules; ++i) sum[i] = MatrixD::Zero(base[i].rows(), base[i].cols());
  std::vector<MatrixD> c(modules);
  for (const Adapter& u : updates) {
    double norm_sq = 0;
    for (size_t i = 0; i < modules; ++i) {
      ASSIGN_OR_RETURN(const size_t j, Matching(u, start, i));
      c[i] = ProjectedProduct(u, j, a_bar[i]) - base[i];
      norm_sq += c[i].squaredNorm();
    }
    const double factor = ClipFactor(std::sqrt(norm_sq), clip_g);
    for (size_t i = 0; i < modules; ++i) sum[i] += factor * c[i];
  }
  std::vector<LoraFairSolution> solutions;
  for (size_t i = 0; i < modules; ++i) {
    NoisyMean({sum[i].data(), static_cast<size_t>(sum[i].size())}, noise_multiplier * clip_g,
              expected_clients, noise);
    LoraFairSolution solution =
        SolveLoraFairInRowSpace(base[i] + sum[i], a_bar[i], global.B(i).cast<double>(), options);
    global.B(i) = solution.b.cast<float>();
    solution.b.resize(0, 0);
    solutions.push_back(std::move(solution));
  }
  return solutions;
}

}  // namespace fedlora::common
