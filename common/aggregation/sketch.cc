#include "common/aggregation/sketch.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "common/tensor/linalg.h"

namespace fedlora::common {
namespace {

// SplitMix64 (Steele, Lea and Flood 2014): a fixed, portable stream of 64-bit values.
uint64_t SplitMix64(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Uniform in (0, 1]: 53 random bits, never 0 (so log is finite).
double UniformOpenClosed(uint64_t& state) {
  return static_cast<double>((SplitMix64(state) >> 11) + 1) * 0x1.0p-53;
}

}  // namespace

const char* SketchStepName(SketchStep step) {
  switch (step) {
    case SketchStep::kRange:
      return "range";
    case SketchStep::kTransposed:
      return "transposed";
    case SketchStep::kPower:
      return "power";
    case SketchStep::kProject:
      return "project";
    case SketchStep::kDense:
      return "dense";
  }
  return "?";
}

std::optional<SketchStep> ParseSketchStep(std::string_view name) {
  for (SketchStep s : {SketchStep::kRange, SketchStep::kTransposed, SketchStep::kPower,
                       SketchStep::kProject, SketchStep::kDense}) {
    if (name == SketchStepName(s)) return s;
  }
  return std::nullopt;
}

int SketchSteps(int power_iterations) { return 2 + 2 * power_iterations; }

SketchStep SketchStepAt(int index, int power_iterations) {
  if (index == 0) return SketchStep::kRange;
  if (index == SketchSteps(power_iterations) - 1) return SketchStep::kProject;
  return index % 2 == 1 ? SketchStep::kTransposed : SketchStep::kPower;
}

MatrixD TestMatrix(uint64_t seed, uint64_t module, int n, int l) {
  uint64_t state = seed ^ (0x736b65746368ull + module * 0x9e3779b97f4a7c15ull);
  SplitMix64(state);
  MatrixD omega(n, l);
  double* v = omega.data();
  const Eigen::Index size = omega.size();
  for (Eigen::Index i = 0; i < size; i += 2) {
    const double radius = std::sqrt(-2.0 * std::log(UniformOpenClosed(state)));
    const double angle = 2.0 * std::numbers::pi * UniformOpenClosed(state);
    v[i] = radius * std::cos(angle);
    if (i + 1 < size) v[i + 1] = radius * std::sin(angle);
  }
  return omega;
}

MatrixD RangeBasis(uint64_t seed, uint64_t module, int n, int l) {
  return OrthonormalBasis(TestMatrix(seed, module, n, l));
}

MatrixD SketchProduct(SketchStep step, const MatrixD& g, const MatrixD& basis) {
  switch (step) {
    case SketchStep::kRange:
    case SketchStep::kPower:
      return g * basis;
    case SketchStep::kTransposed:
      return g.transpose() * basis;
    case SketchStep::kProject:
      return basis.transpose() * g;
    case SketchStep::kDense:
      return g;
  }
  return {};
}

SketchShape SketchProductShape(SketchStep step, int m, int n, int l) {
  switch (step) {
    case SketchStep::kRange:
    case SketchStep::kPower:
      return {m, l};
    case SketchStep::kTransposed:
      return {n, l};
    case SketchStep::kProject:
      return {l, n};
    case SketchStep::kDense:
      return {m, n};
  }
  return {};
}

int SketchColumns(int columns, int m, int n) { return std::min({columns, m, n}); }

SketchShape SketchBasisShape(SketchStep step, int m, int n, int l) {
  switch (step) {
    case SketchStep::kRange:
    case SketchStep::kPower:
      return {n, l};
    case SketchStep::kTransposed:
    case SketchStep::kProject:
      return {m, l};
    case SketchStep::kDense:
      return {0, 0};
  }
  return {};
}

std::vector<MatrixShape> SketchBasisShapes(SketchStep step, const std::vector<MatrixShape>& modules,
                                           int columns) {
  std::vector<MatrixShape> shapes;
  for (const MatrixShape& module : modules) {
    const int m = static_cast<int>(module.rows), n = static_cast<int>(module.cols);
    const SketchShape b = SketchBasisShape(step, m, n, SketchColumns(columns, m, n));
    shapes.push_back({module.name, b.rows, b.cols});
  }
  return shapes;
}

MatrixD OrthonormalBasis(const MatrixD& sum) { return ThinQr(sum).q; }

TopFactors FactorsFromProjection(const MatrixD& q, const MatrixD& z, int rank) {
  const Svd svd = ThinSvd(z);
  return {q * svd.u.leftCols(rank), svd.s.head(rank), svd.v.leftCols(rank).transpose()};
}

}  // namespace fedlora::common
