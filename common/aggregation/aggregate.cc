#include "common/aggregation/aggregate.h"

#include <algorithm>
#include <cmath>
#include <unordered_map>

#include "common/base/parallel.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/linalg.h"

namespace fedlora::common {
namespace {

std::string Label(const Adapter& a, size_t k) {
  return a.source.empty() ? StrCat("client ", k) : StrCat("client ", k, " (", a.source, ")");
}

std::string Shape(int rows, int cols) { return StrCat("[", rows, ",", cols, "]"); }

// ΔW* = Σ_k p_k s_k B_k A_k for one module as stacked factors, b·a = ΔW* (ALGORITHMS.md, FLoRA),
// with ‖ΔW*‖².
struct Stacked {
  MatrixD b;           // m×R: [s_1 B_1 | … | s_K B_K]  (s_k·B·R_k for Fed-SB)
  MatrixD a;           // R×n: [p_1 A_1; …; p_K A_K]
  int r_max = 0;       // max_k r_k
  double norm_sq = 0;  // ‖b·a‖_F²
};

// `index[k]` is the module's index in client k. With `split`, the two R×R Gram matrices are
// computed on two threads (for a single large module, where there is no parallelism across
// modules).
Stacked Stack(std::span<const Adapter> clients, const std::vector<size_t>& index,
              const std::vector<double>& p, bool split) {
  Stacked s;
  StackModule(clients, index, p, &s.b, &s.a);
  for (size_t k = 0; k < clients.size(); ++k)
    s.r_max = std::max(s.r_max, clients[k].module(index[k]).rank);
  const Eigen::Index total = s.a.rows();
  MatrixD gram_b = MatrixD::Zero(total, total), gram_a = MatrixD::Zero(total, total);
  ParallelFor(
      2,
      [&](size_t which) {
        if (which == 0) gram_b.selfadjointView<Eigen::Upper>().rankUpdate(s.b.transpose());
        if (which == 1) gram_a.selfadjointView<Eigen::Upper>().rankUpdate(s.a);
      },
      split ? 2 : 1);
  // ‖BA‖² = tr(BᵀB·AAᵀ): the upper triangles hold both Grams; count off-diagonal terms twice.
  double sum = 0;
  for (Eigen::Index i = 0; i < total; ++i) {
    sum += gram_b(i, i) * gram_a(i, i);
    for (Eigen::Index k = i + 1; k < total; ++k) sum += 2 * gram_b(i, k) * gram_a(i, k);
  }
  s.norm_sq = sum;
  return s;
}

// ‖b·a − ΔW*‖ / ‖ΔW*‖ from r×R products (b: m×r, a: r×n).
double RelativeError(const MatrixD& b, const MatrixD& a, const Stacked& target) {
  const double out_sq = FrobeniusDot(b.transpose() * b, a * a.transpose());
  const double cross = FrobeniusDot(b.transpose() * target.b, a * target.a.transpose());
  const double err_sq = std::max(0.0, target.norm_sq + out_sq - 2 * cross);
  if (target.norm_sq <= 0) return out_sq <= 0 ? 0.0 : INFINITY;
  return std::sqrt(err_sq / target.norm_sq);
}

// The module's output in double, before it is written into the f32 adapter.
struct ModuleOut {
  MatrixD a, b, r;  // r is empty unless Fed-SB
  ModuleReport report;
};

// Aggregates module `i` of `result` (`index[k]` is its index in client k), writes it into `result`,
// and reports.
ModuleReport AggregateModule(Method method, std::span<const Adapter> clients,
                             const std::vector<size_t>& index, const std::vector<double>& p,
                             const LoraFairOptions& fair, bool split, Adapter& result, size_t i) {
  Stacked target = Stack(clients, index, p, split);
  const int r_max = target.r_max;
  ModuleOut out;
  switch (method) {
    case Method::kFedIt:
    case Method::kLoraFair: {
      // Zero-padding to r_max: Ā = Σ p_k A_k, B̄ = Σ p_k s_k B_k over each client's leading rows /
      // columns.
      out.a = MatrixD::Zero(r_max, target.a.cols());
      out.b = MatrixD::Zero(target.b.rows(), r_max);
      for (size_t k = 0; k < clients.size(); ++k)
        AddToSums(Method::kFedIt, clients[k], index[k], p[k], &out.a, &out.b, nullptr);
      if (method == Method::kLoraFair) {
        LoraFairProblem problem;
        problem.g = target.b * (target.a * out.a.transpose());  // Σ p_k B_k (A_k Āᵀ), m×r
        problem.s = out.a * out.a.transpose();
        problem.b_bar = out.b;
        problem.target_norm_sq = target.norm_sq;
        LoraFairSolution sol = SolveLoraFair(problem, fair);
        out.b = std::move(sol.b);
        out.report.lora_fair = std::move(sol);
        out.report.lora_fair.b.resize(0, 0);
      }
      break;
    }
    case Method::kFlora:
      // The stacking itself: A = [p_1 A_1; …; p_K A_K], B = [s_1 B_1 | … | s_K B_K].
      out.a = target.a;
      out.b = target.b;
      break;
    case Method::kFedSb: {
      // R = Σ p_k s_k R_k on the shared B, A (identical across clients, checked by
      // CheckCompatible).
      out.a = clients[0].A(index[0]).cast<double>();
      out.b = clients[0].B(index[0]).cast<double>();
      out.r = MatrixD::Zero(r_max, r_max);
      for (size_t k = 0; k < clients.size(); ++k)
        AddToSums(Method::kFedSb, clients[k], index[k], p[k], nullptr, nullptr, &out.r);
      break;
    }
  }
  result.A(i) = out.a.cast<float>();
  result.B(i) = out.b.cast<float>();
  if (method == Method::kFedSb) result.R(i) = out.r.cast<float>();
  out.report.name = result.module(i).name;
  out.report.rank = result.module(i).rank;
  out.report.target_norm = std::sqrt(std::max(0.0, target.norm_sq));
  // Measured on the f32 values written, so the report covers their rounding too.
  MatrixD b32 = result.B(i).cast<double>();
  if (method == Method::kFedSb) b32 = b32 * result.R(i).cast<double>();
  out.report.relative_error = RelativeError(b32, result.A(i).cast<double>(), target);
  return std::move(out.report);
}

}  // namespace

void AddToSums(Method method, const Adapter& update, size_t j, double weight, MatrixD* a,
               MatrixD* b, MatrixD* r) {
  const LoraModule& m = update.module(j);
  if (method == Method::kFedSb) {
    r->noalias() += (weight * m.scaling) * update.R(j).cast<double>();
    return;
  }
  a->topRows(m.rank).noalias() += weight * update.A(j).cast<double>();
  b->leftCols(m.rank).noalias() += (weight * m.scaling) * update.B(j).cast<double>();
}

void StackModule(std::span<const Adapter> clients, std::span<const size_t> index,
                 std::span<const double> p, MatrixD* b, MatrixD* a) {
  Eigen::Index total = 0;
  for (size_t k = 0; k < clients.size(); ++k) total += clients[k].module(index[k]).rank;
  const LoraModule& first = clients[0].module(index[0]);
  b->resize(first.out_features, total);
  a->resize(total, first.in_features);
  Eigen::Index row = 0;
  for (size_t k = 0; k < clients.size(); ++k) {
    const Adapter& c = clients[k];
    const size_t j = index[k];
    const LoraModule& m = c.module(j);
    if (m.has_r) {
      b->middleCols(row, m.rank).noalias() =
          m.scaling * c.B(j).cast<double>() * c.R(j).cast<double>();
    } else {
      b->middleCols(row, m.rank) = m.scaling * c.B(j).cast<double>();
    }
    a->middleRows(row, m.rank) = p[k] * c.A(j).cast<double>();
    row += m.rank;
  }
}

absl::StatusOr<Adapter> StackAdapters(std::span<const Adapter> clients, std::span<const double> p) {
  if (clients.empty()) return absl::InvalidArgumentError("no adapters to stack");
  std::vector<ModuleShape> shapes;
  for (size_t i = 0; i < clients[0].num_modules(); ++i) {
    ModuleShape s = clients[0].module(i);
    s.rank = 0;
    for (const Adapter& c : clients) s.rank += c.module(i).rank;
    s.scaling = 1.0;
    s.has_r = false;
    shapes.push_back(std::move(s));
  }
  ASSIGN_OR_RETURN(Adapter out, Adapter::Create(shapes));
  out.base_model = clients[0].base_model;
  ParallelFor(shapes.size(), [&](size_t i) {
    const std::vector<size_t> index(clients.size(), i);
    MatrixD b, a;
    StackModule(clients, index, p, &b, &a);
    out.A(i) = a.cast<float>();
    out.B(i) = b.cast<float>();
  });
  return out;
}

absl::Status CheckShapes(const Adapter& update, std::span<const ModuleShape> expected,
                         std::string_view origin, double scaling) {
  for (const ModuleShape& want : expected) {
    const std::optional<size_t> j = update.FindModule(want.name);
    if (!j)
      return absl::InvalidArgumentError(StrCat(origin, ": module ", want.name, " is missing"));
    const LoraModule& got = update.module(*j);
    auto mismatch = [&](std::string_view tensor, int rows, int cols, int want_rows, int want_cols) {
      return absl::InvalidArgumentError(StrCat("module ", want.name, ": ", tensor, " has shape ",
                                               Shape(rows, cols), ", task says ",
                                               Shape(want_rows, want_cols)));
    };
    if (got.rank != want.rank || got.in_features != want.in_features)
      return mismatch("lora_A", got.rank, got.in_features, want.rank, want.in_features);
    if (got.out_features != want.out_features)
      return mismatch("lora_B", got.out_features, got.rank, want.out_features, want.rank);
    // The client's scaling must be the task's (lora_alpha / r as the run set it): a client cannot
    // scale its own weight in the aggregate.
    if (scaling > 0 && !(std::abs(got.scaling - scaling) <= 1e-6 * scaling))
      return absl::InvalidArgumentError(
          StrCat("module ", want.name, ": scaling ", got.scaling, ", the task's is ", scaling));
    if (got.has_r != want.has_r) {
      return absl::InvalidArgumentError(StrCat(
          "module ", want.name, ": ",
          got.has_r ? "has a lora_R the task does not train" : "lacks the lora_R the task trains"));
    }
  }
  // Every expected module is there, so a larger count means more; only then is the extra one
  // looked for, to name it.
  for (size_t i = 0; update.num_modules() > expected.size() && i < update.num_modules(); ++i) {
    const std::string& name = update.module(i).name;
    if (std::none_of(expected.begin(), expected.end(),
                     [&](const ModuleShape& want) { return want.name == name; })) {
      return absl::InvalidArgumentError(StrCat(origin, ": module ", name,
                                               ", which the task does not train (", expected.size(),
                                               " modules asked)"));
    }
  }
  return update.CheckFinite();
}

StreamingAverage::StreamingAverage(Method method, std::vector<ModuleShape> shapes,
                                   const Adapter* frozen)
    : method_(method), shapes_(std::move(shapes)) {
  if (frozen != nullptr) frozen_ = *frozen;
  for (const ModuleShape& s : shapes_) {
    if (method_ == Method::kFedSb) {
      r_.push_back(MatrixD::Zero(s.rank, s.rank));
    } else {
      a_.push_back(MatrixD::Zero(s.rank, s.in_features));
      b_.push_back(MatrixD::Zero(s.out_features, s.rank));
    }
  }
}

void StreamingAverage::Add(const Adapter& update, double weight) {
  // Modules are independent: a large update folds them on every core; a small one (Fed-SB's R) is
  // not worth starting threads for.
  size_t values = 0;
  for (const LoraModule& m : update.modules())
    values += method_ == Method::kFedSb ? static_cast<size_t>(m.rank) * m.rank : m.size();
  ParallelFor(
      shapes_.size(),
      [&](size_t i) {
        const size_t j = *update.FindModule(shapes_[i].name);  // checked: present
        if (method_ == Method::kFedSb) {
          AddToSums(method_, update, j, weight, nullptr, nullptr, &r_[i]);
        } else {
          AddToSums(method_, update, j, weight, &a_[i], &b_[i], nullptr);
        }
      },
      values >= (size_t{1} << 20) ? 0 : 1);
  weight_ += weight;
}

absl::StatusOr<Adapter> StreamingAverage::Mean() const {
  if (weight_ <= 0) return absl::FailedPreconditionError("no update has been folded in");
  Adapter out = frozen_;
  if (method_ != Method::kFedSb) {
    ASSIGN_OR_RETURN(out, Adapter::Create(shapes_));
  }
  for (size_t i = 0; i < shapes_.size(); ++i) {
    out.set_scaling(i, 1.0);
    if (method_ == Method::kFedSb) {
      out.R(i) = (r_[i] / weight_).cast<float>();
    } else {
      out.A(i) = (a_[i] / weight_).cast<float>();
      out.B(i) = (b_[i] / weight_).cast<float>();
    }
  }
  return out;
}

std::string_view MethodName(Method method) {
  switch (method) {
    case Method::kFedIt:
      return "fedit";
    case Method::kFlora:
      return "flora";
    case Method::kLoraFair:
      return "lora-fair";
    case Method::kFedSb:
      return "fed-sb";
  }
  return "?";
}

absl::StatusOr<Method> ParseMethod(std::string_view name) {
  for (Method m : kAllMethods) {
    if (MethodName(m) == name) return m;
  }
  return absl::InvalidArgumentError(
      StrCat("unknown method '", name, "' (expected fedit, flora, lora-fair or fed-sb)"));
}

absl::StatusOr<std::vector<double>> NormalizeWeights(std::span<const double> weights,
                                                     size_t count) {
  if (count == 0) return absl::InvalidArgumentError("no clients to weight");
  if (weights.empty()) return std::vector<double>(count, 1.0 / static_cast<double>(count));
  if (weights.size() != count) {
    return absl::InvalidArgumentError(
        StrCat(weights.size(), " weights given for ", count,
               " adapters; give one weight per adapter, in the same order"));
  }
  double total = 0;
  for (size_t k = 0; k < weights.size(); ++k) {
    if (!std::isfinite(weights[k]) || weights[k] < 0) {
      return absl::InvalidArgumentError(StrCat("weight ", k + 1, " is ", weights[k],
                                               "; weights must be finite and non-negative"));
    }
    total += weights[k];
  }
  if (total <= 0)
    return absl::InvalidArgumentError("the weights sum to 0; at least one must be positive");
  std::vector<double> p(weights.begin(), weights.end());
  for (double& x : p) x /= total;
  return p;
}

absl::Status CheckCompatible(std::span<const Adapter> clients, Method method) {
  if (clients.empty()) return absl::InvalidArgumentError("no adapters to aggregate");
  const Adapter& ref = clients[0];
  for (size_t k = 0; k < clients.size(); ++k) {
    const Adapter& c = clients[k];
    if (absl::Status st = c.CheckFinite(); !st.ok()) {
      return absl::InvalidArgumentError(StrCat(Label(c, k), ": ", st.message()));
    }
    for (size_t i = 0; i < ref.num_modules(); ++i) {
      const LoraModule& rm = ref.module(i);
      auto j = c.FindModule(rm.name);
      if (!j) {
        return absl::InvalidArgumentError(StrCat(Label(c, k), " has no module ", rm.name,
                                                 ", which ", Label(ref, 0),
                                                 " has; all adapters must adapt the same modules"));
      }
      const LoraModule& cm = c.module(*j);
      auto where = [&](std::string_view what) {
        return absl::InvalidArgumentError(StrCat(Label(c, k), ": module ", rm.name, ": ", what));
      };
      if (cm.in_features != rm.in_features || cm.out_features != rm.out_features) {
        return where(StrCat("lora_A is ", Shape(cm.rank, cm.in_features), " and lora_B ",
                            Shape(cm.out_features, cm.rank), " (a ", cm.out_features, "x",
                            cm.in_features, " layer), but ", Label(ref, 0), " adapts a ",
                            rm.out_features, "x", rm.in_features,
                            " layer; hint: adapters of different base models?"));
      }
      if (method == Method::kFedSb) {
        if (!cm.has_r) {
          return where(
              "has no lora_R; fed-sb aggregates LoRA-SB adapters (B·R·A with B, A frozen)");
        }
        if (cm.rank != rm.rank) {
          return where(StrCat("lora_R is ", Shape(cm.rank, cm.rank), " but ", Label(ref, 0),
                              " has ", Shape(rm.rank, rm.rank),
                              "; fed-sb needs equal ranks (R is averaged)"));
        }
        auto same = [](const ConstMapF& x, const ConstMapF& y) {
          const float tol = 1e-6f * std::max(1.0f, y.cwiseAbs().maxCoeff());
          return (x - y).cwiseAbs().maxCoeff() <= tol;
        };
        for (const char* t : {"lora_A", "lora_B"}) {
          bool equal = t[5] == 'A' ? same(c.A(*j), ref.A(i)) : same(c.B(*j), ref.B(i));
          if (!equal) {
            return where(StrCat(t, " differs from ", Label(ref, 0),
                                "'s; fed-sb needs the frozen B and A shared by all clients"));
          }
        }
      } else if (cm.has_r) {
        return where(StrCat("has lora_R (a LoRA-SB adapter); ", MethodName(method),
                            " aggregates plain LoRA adapters: use --method fed-sb"));
      }
    }
    if (c.num_modules() != ref.num_modules()) {
      for (const LoraModule& cm : c.modules()) {
        if (!ref.FindModule(cm.name)) {
          return absl::InvalidArgumentError(
              StrCat(Label(c, k), " has module ", cm.name, ", which ", Label(ref, 0),
                     " does not; all adapters must adapt the same modules"));
        }
      }
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<AggregateResult> Aggregate(std::span<const Adapter> clients,
                                          std::span<const double> weights,
                                          const AggregateOptions& options) {
  ASSIGN_OR_RETURN(std::vector<double> p, NormalizeWeights(weights, clients.size()));
  RETURN_IF_ERROR(CheckCompatible(clients, options.method));
  if (options.method == Method::kLoraFair && !(options.lora_fair.lambda >= 0)) {
    return absl::InvalidArgumentError(
        StrCat("lambda is ", options.lora_fair.lambda, "; it must be >= 0"));
  }
  std::vector<std::unordered_map<std::string_view, size_t>> lookup(clients.size());
  for (size_t k = 0; k < clients.size(); ++k) {
    for (size_t i = 0; i < clients[k].num_modules(); ++i) lookup[k][clients[k].module(i).name] = i;
  }
  const Adapter& ref = clients[0];
  const size_t num_modules = ref.num_modules();
  // The output's layout is known before any arithmetic: rank r_max (fedit, lora-fair, fed-sb) or Σ
  // r_k (flora).
  std::vector<std::vector<size_t>> index(num_modules, std::vector<size_t>(clients.size()));
  std::vector<ModuleShape> shapes;
  for (size_t i = 0; i < num_modules; ++i) {
    ModuleShape s = ref.module(i);
    int r_max = 0, r_sum = 0;
    for (size_t k = 0; k < clients.size(); ++k) {
      index[i][k] = lookup[k].at(s.name);
      const int r = clients[k].module(index[i][k]).rank;
      r_max = std::max(r_max, r);
      r_sum += r;
    }
    s.rank = options.method == Method::kFlora ? r_sum : r_max;
    s.scaling = 1.0;
    s.has_r = options.method == Method::kFedSb;
    shapes.push_back(std::move(s));
  }
  AggregateResult result;
  ASSIGN_OR_RETURN(result.adapter, Adapter::Create(shapes));
  result.adapter.base_model = ref.base_model;
  result.modules.resize(num_modules);
  // Modules are independent: one per thread, each written straight into the output, so the
  // temporaries in flight are a thread's one module. Eigen runs single-threaded inside each.
  ParallelFor(num_modules, [&](size_t i) {
    result.modules[i] = AggregateModule(options.method, clients, index[i], p, options.lora_fair,
                                        num_modules == 1, result.adapter, i);
  });
  // Finite inputs with bounded scalings can still overflow in float (values near 3e38): such a
  // result is an error, never an adapter.
  if (absl::Status finite = result.adapter.CheckFinite(); !finite.ok())
    return absl::InvalidArgumentError(StrCat("the aggregate is not finite (", finite.message(),
                                             "); an input's values are too large for float"));
  return result;
}

}  // namespace fedlora::common
