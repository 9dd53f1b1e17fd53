#include "server/fed_sb_init.h"

#include <cmath>

#include "common/base/parallel.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/linalg.h"
#include "server/tasks.h"

namespace fedlora::server {
namespace {

using common::MatrixD;
using common::SketchStep;
using common::StrCat;

int Columns(const FedSbInit& init, const ModuleSpec& m) {
  return common::SketchColumns(init.columns, m.out_features, m.in_features);
}

}  // namespace

std::optional<FedSbInit> NewFedSbInit(const ServerOptions& o) {
  if (o.method != common::Method::kFedSb || o.fed_sb_init == "random") return std::nullopt;
  return FedSbInit{o.fed_sb_init == "dense" ? FedSbInit::Mode::kDense : FedSbInit::Mode::kSketch,
                   o.rank + o.fed_sb_oversampling,
                   o.fed_sb_power_iterations,
                   o.fed_sb_init_examples,
                   o.fed_sb_init_lr,
                   o.seed ^ 0x6665642d7362ull,
                   {}};
}

SketchStep InitStepKind(const FedSbInit& init, int step) {
  return init.mode == FedSbInit::Mode::kDense ? SketchStep::kDense
                                              : common::SketchStepAt(step, init.power_iterations);
}

std::vector<common::MatrixShape> InitProductShapes(const Ledger& ledger, int step) {
  const FedSbInit& init = *ledger.init;
  std::vector<common::MatrixShape> out;
  for (const ModuleSpec& m : ledger.modules) {
    const common::SketchShape s = common::SketchProductShape(
        InitStepKind(init, step), m.out_features, m.in_features, Columns(init, m));
    out.push_back({m.name, s.rows, s.cols});
  }
  return out;
}

void FillSketchTask(const Ledger& ledger, v1::Task* task) {
  const FedSbInit& init = *ledger.init;
  const int step = static_cast<int>(init.steps.size());
  v1::SketchTask* s = task->mutable_sketch();
  s->set_step(step);
  s->set_steps(init.total_steps());
  s->set_product(common::SketchStepName(InitStepKind(init, step)));
  s->set_seed(init.seed);
  s->set_columns(init.columns);
  s->set_examples(init.examples);
  if (step > 0) *task->add_downloads() = ToProto(init.steps.back().basis);
}

absl::StatusOr<common::Adapter> CommitInitStep(StateStore& store, int rank,
                                               const RoundOutput& output,
                                               common::InitStepRecord record) {
  const std::vector<MatrixD>& sums = output.sums;
  const double weight = output.weight;
  Ledger ledger = store.ledger();
  if (output.dp_state) ledger.client_dp = output.dp_state;
  FedSbInit& init = *ledger.init;
  const int step = static_cast<int>(init.steps.size());
  const SketchStep kind = InitStepKind(init, step);
  if (step + 1 < init.total_steps()) {
    std::vector<common::NamedMatrix> bases(sums.size());
    common::ParallelFor(sums.size(), [&](size_t i) {
      bases[i] = {ledger.modules[i].name, common::OrthonormalBasis(sums[i])};
    });
    ASSIGN_OR_RETURN(BlobRef blob,
                     store.PutBlob(common::EncodeMatrices(bases), BlobKind::kBasis, -1));
    init.steps.push_back({std::move(blob), std::move(record)});
    RETURN_IF_ERROR(store.SaveLedger(ledger));  // the commit
    return common::Adapter();
  }
  // The last step: version 0.
  std::vector<MatrixD> q(sums.size());
  if (kind == SketchStep::kProject) {
    std::vector<common::MatrixShape> shapes;
    for (const ModuleSpec& m : ledger.modules)
      shapes.push_back({m.name, m.out_features, Columns(init, m)});
    const BlobRef& basis = init.steps.back().basis;
    ASSIGN_OR_RETURN(std::string bytes, store.ReadWholeBlob(basis.sha256));
    ASSIGN_OR_RETURN(q, common::DecodeMatrices(bytes, StrCat("basis blob ", basis.sha256), shapes));
  }
  for (size_t i = 0; i < sums.size(); ++i) {
    if (!(sums[i].norm() > 0)) {
      return absl::FailedPreconditionError(
          StrCat("the clients' summed gradient of ", ledger.modules[i].name,
                 " is zero: Fed-SB cannot initialise from it (use fed_sb_init = random)"));
    }
  }
  ASSIGN_OR_RETURN(common::Adapter frozen, common::Adapter::Create(ledger.Shapes(rank, true)));
  common::ParallelFor(sums.size(), [&](size_t i) {
    const MatrixD mean = sums[i] / weight;
    common::TopFactors f;
    if (kind == SketchStep::kDense) {  // ΔW = −η·sign(G), as the trainer's LoRA-SB
      const MatrixD delta = mean.unaryExpr(
          [&](double g) { return -init.lr * static_cast<double>((g > 0) - (g < 0)); });
      const common::Svd svd = common::ThinSvd(delta);
      f = {svd.u.leftCols(rank), svd.s.head(rank), svd.v.leftCols(rank).transpose()};
    } else {  // ΔW = −η·G/rms(G), rms(G) = ‖G‖_F/√(mn) ≈ ‖Z‖_F/√(mn)
      f = common::FactorsFromProjection(q[i], mean, rank);
      f.s *= -init.lr * std::sqrt(static_cast<double>(mean.cols()) * q[i].rows()) / mean.norm();
    }
    frozen.B(i) = f.u.cast<float>();
    frozen.A(i) = f.vt.cast<float>();
    frozen.R(i).setZero();
    frozen.R(i).diagonal() = f.s.cast<float>();
  });
  // The whole initialisation's traffic, every step's added up.
  auto add = [](common::PerClient& total, const common::PerClient& step) {
    for (const auto& [id, b] : step) total[id] += b;
  };
  for (const FedSbInit::Step& s : init.steps) {
    add(record.init_bytes_up, s.record.who.bytes_up);
    add(record.init_bytes_down, s.record.who.bytes_down);
  }
  add(record.init_bytes_up, record.who.bytes_up);
  add(record.init_bytes_down, record.who.bytes_down);
  ASSIGN_OR_RETURN(BlobRef blob,
                   store.PutBlob(common::EncodeAdapter(frozen), BlobKind::kFrozen, 0));
  ledger.versions.push_back({0, {std::move(blob)}, std::nullopt, std::move(record)});
  RETURN_IF_ERROR(store.SaveLedger(ledger));  // the commit
  return frozen;
}

}  // namespace fedlora::server
