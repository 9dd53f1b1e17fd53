// The federated randomized SVD behind Fed-SB's initialisation (Halko, Martinsson and Tropp 2011,
// Algorithm 4.4 with the power scheme; ../shared/ALGORITHMS.md, "Fed-SB"). Per module, the
// coordinator wants the top-r singular factors of G = Σ_k p_k G_k, where client k alone holds G_k
// (m×n, its loss gradient with respect to the frozen weight). No client sends an m×n matrix: every
// step, each client applies its G_k to a thin basis and the coordinator sums the products, which
// are linear in G_k, so the sum is the product of G:
//
//   range (first)        Y = G·Ω   m×l, Ω (n×l) drawn by everyone from the run's seed
//   power iterations     Ỹ = Gᵀ·Q  n×l, then Y = G·Q̃  m×l, q times
//   projection (last)    Z = Qᵀ·G  l×n
//
// where l = r + oversampling and each basis is the orthonormalised sum of the step before. Then
// Q·Z = Q·Qᵀ·G ≈ G, and the SVD of the small Z gives G's top-r factors: G ≈ (Q·Û_r)·Σ_r·V_rᵀ.
// The dense variant is one step in which every client sends G_k itself.
#ifndef FEDLORA_COMMON_AGGREGATION_SKETCH_H_
#define FEDLORA_COMMON_AGGREGATION_SKETCH_H_

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "common/tensor/blob.h"
#include "common/tensor/eigen_types.h"

namespace fedlora::common {

enum class SketchStep {
  kRange,       // G·Ω
  kTransposed,  // Gᵀ·Q, the first half of a power iteration
  kPower,       // G·Q̃, the second half
  kProject,     // Qᵀ·G
  kDense,       // G itself (the dense variant: m×n per module, once)
};
const char* SketchStepName(SketchStep step);
std::optional<SketchStep> ParseSketchStep(std::string_view name);

// The steps of a sketch with q power iterations: 2 + 2q, range first and projection last.
int SketchSteps(int power_iterations);
SketchStep SketchStepAt(int index, int power_iterations);

// The Gaussian test matrix Ω (n×l) of module `module`, the same on every machine: standard
// normal entries by Box–Muller from a SplitMix64 stream of (seed, module), not from <random>,
// whose distributions differ between standard libraries.
MatrixD TestMatrix(uint64_t seed, uint64_t module, int n, int l);
// The range step's basis: TestMatrix orthonormalised. It spans what Ω spans, so the range G·Ω
// finds is the same (Q = orth(G·Ω) depends on Ω's span only), and ‖Ω‖₂ = 1, so that no basis a
// client applies stretches its gradient (what bounds one record's or one client's effect under DP).
MatrixD RangeBasis(uint64_t seed, uint64_t module, int n, int l);

// What a client holding the dense G sends for `step`, given the step's basis (Ω or Q): G·basis,
// Gᵀ·basis, basisᵀ·G, or G (basis unused). (The LLM trainer forms the products without G.)
MatrixD SketchProduct(SketchStep step, const MatrixD& g, const MatrixD& basis);

// The shape of a step's product for an m×n module and sketch width l.
struct SketchShape {
  int rows = 0, cols = 0;
};
SketchShape SketchProductShape(SketchStep step, int m, int n, int l);

// The sketch's width on an m×n module: the requested columns (r + oversampling), capped by m, n.
int SketchColumns(int columns, int m, int n);
// The basis a client applies at `step` (Ω for range; the previous step's basis otherwise; none,
// 0×0, for dense).
SketchShape SketchBasisShape(SketchStep step, int m, int n, int l);
// The bases of `step` for modules of m×n (rows = m = out_features, cols = n = in_features; values
// ignored) at the requested width `columns`, named as the modules.
std::vector<MatrixShape> SketchBasisShapes(SketchStep step, const std::vector<MatrixShape>& modules,
                                           int columns);

// The orthonormal basis of a summed range product (thin Householder QR: m×l with Qᵀ·Q = I). Its
// columns keep the sum's span; a rank-deficient sum still gives l orthonormal columns.
MatrixD OrthonormalBasis(const MatrixD& sum);

// G's top-r factors from the last basis Q (m×l) and the summed projection Z = Qᵀ·G (l×n):
// u = Q·Û_r (m×r, orthonormal columns), s = Σ_r (descending), vt = V_rᵀ (r×n, orthonormal rows).
struct TopFactors {
  MatrixD u;
  Eigen::VectorXd s;
  MatrixD vt;
};
TopFactors FactorsFromProjection(const MatrixD& q, const MatrixD& z, int rank);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_AGGREGATION_SKETCH_H_
