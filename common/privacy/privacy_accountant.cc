#include "common/privacy/privacy_accountant.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b))
double LogAdd(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  const double hi = std::max(a, b), lo = std::min(a, b);
  return hi + std::log1p(std::exp(lo - hi));
}

// log(exp(a) − exp(b)) for a ≥ b.
double LogSub(double a, double b) {
  if (b == -kInf) return a;
  if (a <= b) return -kInf;  // a == b: exact cancellation (a < b does not arise for these series)
  return a + std::log1p(-std::exp(b - a));
}

// log(erfc(x)), accurate where erfc underflows: the asymptotic series of erfc for large x (as
// TF-Privacy's).
double LogErfc(double x) {
  const double r = std::erfc(x);
  if (r > 0 && x < 25) return std::log(r);
  return -std::log(M_PI) / 2 - std::log(x) - x * x - 0.5 / (x * x) + 0.625 / std::pow(x, 4) -
         37.0 / 24.0 / std::pow(x, 6) + 353.0 / 64.0 / std::pow(x, 8);
}

// log A_α for integer α: log Σ_{i=0..α} C(α,i) q^i (1−q)^(α−i) exp((i² − i)/(2σ²)).
double LogAInt(double q, double sigma, int alpha) {
  double log_a = -kInf;
  for (int i = 0; i <= alpha; ++i) {
    const double log_binom =
        std::lgamma(alpha + 1.0) - std::lgamma(i + 1.0) - std::lgamma(alpha - i + 1.0);
    const double term = log_binom + i * std::log(q) + (alpha - i) * std::log1p(-q) +
                        (static_cast<double>(i) * i - i) / (2 * sigma * sigma);
    log_a = LogAdd(log_a, term);
  }
  return log_a;
}

// log A_α for fractional α: the two-series formula (Mironov, Talwar, Zhang 2019, Section 3.3;
// Opacus _compute_log_a_frac), summed until both terms fall below e^−30.
double LogAFrac(double q, double sigma, double alpha) {
  double log_a0 = -kInf, log_a1 = -kInf;
  const double z0 = sigma * sigma * std::log(1 / q - 1) + 0.5;
  double log_coef = 0;  // log |C(α, i)|, updated as C(α, i+1) = C(α, i)·(α − i)/(i + 1)
  bool positive = true;
  for (int i = 0;; ++i) {
    const double j = alpha - i;
    const double log_t0 = log_coef + i * std::log(q) + j * std::log1p(-q);
    const double log_t1 = log_coef + j * std::log(q) + i * std::log1p(-q);
    const double log_e0 = std::log(0.5) + LogErfc((i - z0) / (M_SQRT2 * sigma));
    const double log_e1 = std::log(0.5) + LogErfc((z0 - j) / (M_SQRT2 * sigma));
    const double log_s0 = log_t0 + (static_cast<double>(i) * i - i) / (2 * sigma * sigma) + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / (2 * sigma * sigma) + log_e1;
    if (positive) {
      log_a0 = LogAdd(log_a0, log_s0);
      log_a1 = LogAdd(log_a1, log_s1);
    } else {
      log_a0 = LogSub(log_a0, log_s0);
      log_a1 = LogSub(log_a1, log_s1);
    }
    if (std::max(log_s0, log_s1) < -30 || i > 100000) break;
    const double factor = (alpha - i) / (i + 1.0);
    if (factor == 0) break;  // C(α, i) = 0 beyond here (integer α; not reached for fractional α)
    log_coef += std::log(std::abs(factor));
    if (factor < 0) positive = !positive;
  }
  return LogAdd(log_a0, log_a1);
}

absl::Status CheckDelta(double delta) {
  if (!(delta > 0 && delta < 1)) {
    return absl::InvalidArgumentError(
        StrCat("delta is ", delta, "; it must be in (0, 1), typically below 1/N"));
  }
  return absl::OkStatus();
}

}  // namespace

std::vector<double> DefaultRdpOrders() {
  std::vector<double> orders;
  for (int x = 1; x < 100; ++x) orders.push_back(1 + x / 10.0);
  for (int a = 12; a < 64; ++a) orders.push_back(a);
  return orders;
}

double SampledGaussianRdp(double q, double sigma, double alpha) {
  if (q == 0) return 0;
  if (sigma == 0) return kInf;
  if (q == 1) return alpha / (2 * sigma * sigma);
  if (std::isinf(alpha)) return kInf;
  const double log_a = alpha == std::floor(alpha) ? LogAInt(q, sigma, static_cast<int>(alpha))
                                                  : LogAFrac(q, sigma, alpha);
  return log_a / (alpha - 1);
}

double DistributedDiscreteGaussianRdp(double alpha, double l2, double l1, double local_sigma,
                                      int summands, double dim) {
  if (!(local_sigma > 0)) return kInf;
  double tau = 0;
  for (int k = 1; k < summands; ++k)
    tau += std::exp(-2 * M_PI * M_PI * local_sigma * local_sigma * k / (k + 1.0));
  tau *= 10;
  const double s = std::sqrt(static_cast<double>(summands)) * local_sigma;
  const double a = l2 / s, b = l1 / s;
  return std::min({alpha / 2 * a * a + tau * dim,
                   alpha / 2 * (a * a + 2 * b * tau + tau * tau * dim),
                   alpha / 2 * std::pow(a + tau * std::sqrt(dim), 2)});
}

void RdpAccountant::AddRdp(const std::function<double(double)>& rdp) {
  for (size_t i = 0; i < orders_.size(); ++i) rdp_[i] += rdp(orders_[i]);
}

RdpAccountant::RdpAccountant(std::vector<double> orders)
    : orders_(std::move(orders)), rdp_(orders_.size(), 0.0) {}

absl::Status RdpAccountant::AddSteps(double q, double sigma, double steps) {
  if (!(q >= 0 && q <= 1))
    return absl::InvalidArgumentError(StrCat("sample rate is ", q, "; it must be in [0, 1]"));
  if (!(sigma >= 0) || std::isinf(sigma)) {
    return absl::InvalidArgumentError(
        StrCat("noise multiplier is ", sigma, "; it must be finite and >= 0"));
  }
  if (!(steps >= 0) || std::isinf(steps)) {
    return absl::InvalidArgumentError(StrCat("steps is ", steps, "; it must be finite and >= 0"));
  }
  if (steps == 0) return absl::OkStatus();
  for (size_t i = 0; i < orders_.size(); ++i)
    rdp_[i] += steps * SampledGaussianRdp(q, sigma, orders_[i]);
  return absl::OkStatus();
}

absl::StatusOr<PrivacySpent> RdpAccountant::Spent(double delta) const {
  RETURN_IF_ERROR(CheckDelta(delta));
  PrivacySpent best{kInf, orders_.empty() ? 0 : orders_[0]};
  for (size_t i = 0; i < orders_.size(); ++i) {
    const double a = orders_[i];
    const double eps = rdp_[i] - (std::log(delta) + std::log(a)) / (a - 1) + std::log((a - 1) / a);
    if (eps < best.epsilon) best = {eps, a};
  }
  best.epsilon = std::max(0.0, best.epsilon);
  return best;
}

nlohmann::json PrivacyHistoryToJson(const PrivacyHistory& history) {
  nlohmann::json out = nlohmann::json::array();
  for (const PrivacyRound& r : history) {
    nlohmann::json e = {{"round", r.round}, {"q", r.q}, {"sigma", r.sigma}, {"steps", r.steps}};
    if (r.ddg)
      e["ddg"] = {{"l2", r.ddg->l2},
                  {"l1", r.ddg->l1},
                  {"local_sigma", r.ddg->local_sigma},
                  {"summands", r.ddg->summands},
                  {"dim", r.ddg->dim}};
    out.push_back(std::move(e));
  }
  return out;
}

absl::StatusOr<PrivacyHistory> PrivacyHistoryFromJson(const nlohmann::json& json,
                                                      std::string_view origin) {
  if (!json.is_array())
    return absl::InvalidArgumentError(StrCat(origin, ": expected an array, found ", json.dump()));
  PrivacyHistory history;
  for (size_t i = 0; i < json.size(); ++i) {
    const nlohmann::json& r = json[i];
    auto number = [&](const char* key) { return r.contains(key) && r[key].is_number(); };
    if (!r.is_object() || !number("q") || !number("sigma") || !number("steps") ||
        (r.contains("round") && !r["round"].is_number_integer())) {
      return absl::InvalidArgumentError(StrCat(origin, ": privacy history entry ", i, " is ",
                                               r.dump(), "; expected numbers q, sigma and steps"));
    }
    history.push_back({r.value("round", int64_t{0}), r["q"].get<double>(), r["sigma"].get<double>(),
                       r["steps"].get<double>()});
    if (r.contains("ddg")) {
      const nlohmann::json& d = r["ddg"];
      const auto positive = [&](const char* key) {
        return d.is_object() && d.contains(key) && d[key].is_number() && d[key].get<double>() > 0;
      };
      if (!positive("l2") || !positive("l1") || !positive("local_sigma") || !positive("summands") ||
          !positive("dim") || !d["summands"].is_number_integer())
        return absl::InvalidArgumentError(
            StrCat(origin, ": privacy history entry ", i, " has ddg ", d.dump(),
                   "; expected positive l2, l1, local_sigma, dim and an integer summands"));
      history.back().ddg = DistributedGaussian{d["l2"].get<double>(), d["l1"].get<double>(),
                                               d["local_sigma"].get<double>(),
                                               d["summands"].get<int>(), d["dim"].get<double>()};
    }
  }
  return history;
}

absl::StatusOr<PrivacySpent> SpentOver(const PrivacyHistory& history, double delta) {
  RdpAccountant accountant;
  for (size_t i = 0; i < history.size(); ++i) {
    if (const auto& d = history[i].ddg) {
      const double steps = history[i].steps;
      accountant.AddRdp([&](double alpha) {
        return steps * DistributedDiscreteGaussianRdp(alpha, d->l2, d->l1, d->local_sigma,
                                                      d->summands, d->dim);
      });
      continue;
    }
    if (absl::Status st = accountant.AddSteps(history[i].q, history[i].sigma, history[i].steps);
        !st.ok()) {
      return absl::InvalidArgumentError(StrCat("privacy history entry ", i, ": ", st.message()));
    }
  }
  return accountant.Spent(delta);
}

absl::StatusOr<PrivacySpent> EpsilonFor(double q, double sigma, double steps, double delta) {
  RdpAccountant accountant;
  RETURN_IF_ERROR(accountant.AddSteps(q, sigma, steps));
  return accountant.Spent(delta);
}

absl::StatusOr<double> NoiseMultiplierFor(double target_epsilon, double q, double steps,
                                          double delta) {
  if (!(target_epsilon > 0) || std::isinf(target_epsilon)) {
    return absl::InvalidArgumentError(
        StrCat("target epsilon is ", target_epsilon, "; it must be finite and > 0"));
  }
  RETURN_IF_ERROR(CheckDelta(delta));
  auto eps = [&](double sigma) -> absl::StatusOr<double> {
    ASSIGN_OR_RETURN(PrivacySpent spent, EpsilonFor(q, sigma, steps, delta));
    return spent.epsilon;
  };
  double low = 0, high = 1;
  for (;;) {
    ASSIGN_OR_RETURN(double e, eps(high));
    if (e <= target_epsilon) break;
    if (high > 1e6) {
      return absl::InvalidArgumentError(StrCat("no noise multiplier up to 1e6 reaches epsilon ",
                                               target_epsilon, " for q ", q, ", ", steps,
                                               " steps and delta ", delta));
    }
    low = high;
    high *= 2;
  }
  while (high - low > 1e-6 * high) {
    const double mid = (low + high) / 2;
    ASSIGN_OR_RETURN(double e, eps(mid));
    (e <= target_epsilon ? high : low) = mid;
  }
  return high;
}

}  // namespace fedlora::common
