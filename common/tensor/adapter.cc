#include "common/tensor/adapter.h"

#include <cmath>
#include <set>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/linalg.h"

namespace fedlora::common {

size_t LoraModule::size() const {
  const size_t r = static_cast<size_t>(rank);
  return r * static_cast<size_t>(in_features) + static_cast<size_t>(out_features) * r +
         (has_r ? r * r : 0);
}

absl::Status CheckModuleName(std::string_view name) {
  if (name.empty() || name.size() > kMaxModuleName) {
    return absl::InvalidArgumentError(
        StrCat("a module name of ", name.size(), " bytes; expected 1 to ", kMaxModuleName));
  }
  if (!IsUtf8(name)) {
    return absl::InvalidArgumentError(
        StrCat("a module name of ", name.size(), " bytes is not UTF-8"));
  }
  return absl::OkStatus();
}

absl::StatusOr<Adapter> Adapter::Create(const std::vector<ModuleShape>& modules, Adapter reuse) {
  Adapter adapter;
  adapter.buffer_ = std::move(reuse.buffer_);
  std::set<std::string_view> names;
  size_t offset = 0;
  for (const ModuleShape& shape : modules) {
    RETURN_IF_ERROR(CheckModuleName(shape.name));
    if (!InFeatureRange(shape.rank) || !InFeatureRange(shape.in_features) ||
        !InFeatureRange(shape.out_features)) {
      return absl::InvalidArgumentError(StrCat("module ", shape.name, ": rank ", shape.rank, ", n ",
                                               shape.in_features, " and m ", shape.out_features,
                                               " must all be in [1, ", kMaxFeatures, "]"));
    }
    if (!std::isfinite(shape.scaling) || std::abs(shape.scaling) > kMaxScaling) {
      return absl::InvalidArgumentError(StrCat("module ", shape.name, ": scaling ", shape.scaling,
                                               " is outside [-", kMaxScaling, ", ", kMaxScaling,
                                               "] (lora_alpha / r is about 0.5 to 4 in practice)"));
    }
    if (!names.insert(shape.name).second) {
      return absl::InvalidArgumentError(StrCat("module ", shape.name, " appears twice"));
    }
    LoraModule m;
    static_cast<ModuleShape&>(m) = shape;
    const size_t r = static_cast<size_t>(shape.rank);
    m.a_offset = offset;
    m.b_offset = m.a_offset + r * static_cast<size_t>(shape.in_features);
    m.r_offset = m.b_offset + static_cast<size_t>(shape.out_features) * r;
    offset += m.size();
    adapter.modules_.push_back(std::move(m));
  }
  adapter.buffer_.assign(offset, 0.0f);
  return adapter;
}

std::optional<size_t> Adapter::FindModule(std::string_view name) const {
  for (size_t i = 0; i < modules_.size(); ++i) {
    if (modules_[i].name == name) return i;
  }
  return std::nullopt;
}

MapF Adapter::A(size_t i) {
  const LoraModule& m = modules_[i];
  return MapF(buffer_.data() + m.a_offset, m.rank, m.in_features);
}
MapF Adapter::B(size_t i) {
  const LoraModule& m = modules_[i];
  return MapF(buffer_.data() + m.b_offset, m.out_features, m.rank);
}
MapF Adapter::R(size_t i) {
  const LoraModule& m = modules_[i];
  return MapF(buffer_.data() + m.r_offset, m.rank, m.rank);
}
ConstMapF Adapter::A(size_t i) const {
  const LoraModule& m = modules_[i];
  return ConstMapF(buffer_.data() + m.a_offset, m.rank, m.in_features);
}
ConstMapF Adapter::B(size_t i) const {
  const LoraModule& m = modules_[i];
  return ConstMapF(buffer_.data() + m.b_offset, m.out_features, m.rank);
}
ConstMapF Adapter::R(size_t i) const {
  const LoraModule& m = modules_[i];
  return ConstMapF(buffer_.data() + m.r_offset, m.rank, m.rank);
}

double Adapter::DeltaNorm(size_t i) const {
  const LoraModule& m = modules_[i];
  MatrixD b = B(i).cast<double>();
  if (m.has_r) b = b * R(i).cast<double>();
  const MatrixD a = A(i).cast<double>();
  const MatrixD gram_b = b.transpose() * b;  // r×r
  const MatrixD gram_a = a * a.transpose();  // r×r
  // ‖B·A‖² = tr(Bᵀ·B·A·Aᵀ); both Grams are symmetric, so the trace is their elementwise product
  // summed.
  return std::abs(m.scaling) * std::sqrt(std::max(0.0, gram_b.cwiseProduct(gram_a).sum()));
}

absl::Status Adapter::CheckFinite() const {
  for (size_t i = 0; i < modules_.size(); ++i) {
    const LoraModule& m = modules_[i];
    auto check = [&](const float* p, size_t n, std::string_view tensor) -> absl::Status {
      for (size_t k = 0; k < n; ++k) {
        if (!std::isfinite(p[k])) {
          return absl::InvalidArgumentError(StrCat("module ", m.name, ": ", tensor,
                                                   " holds a non-finite value (", p[k],
                                                   ") at flat index ", k, "; diverged training?"));
        }
      }
      return absl::OkStatus();
    };
    const size_t r = static_cast<size_t>(m.rank);
    if (auto st = check(buffer_.data() + m.a_offset, r * m.in_features, "lora_A"); !st.ok())
      return st;
    if (auto st = check(buffer_.data() + m.b_offset, m.out_features * r, "lora_B"); !st.ok())
      return st;
    if (m.has_r) {
      if (auto st = check(buffer_.data() + m.r_offset, r * r, "lora_R"); !st.ok()) return st;
    }
  }
  return absl::OkStatus();
}

Adapter Adapter::FoldR() const {
  std::vector<ModuleShape> shapes;
  for (const LoraModule& m : modules_) {
    ModuleShape s = m;
    s.has_r = false;
    shapes.push_back(s);
  }
  Adapter out = *Create(shapes);  // The shapes come from a valid adapter.
  out.source = source;
  out.base_model = base_model;
  for (size_t i = 0; i < modules_.size(); ++i) {
    out.A(i) = A(i);
    if (modules_[i].has_r) {
      out.B(i).noalias() = (B(i).cast<double>() * R(i).cast<double>()).cast<float>();
    } else {
      out.B(i) = B(i);
    }
  }
  return out;
}

void InitLoraA(MapF a, std::mt19937_64& rng) {
  const float bound = 1.0f / std::sqrt(static_cast<float>(a.cols()));
  std::uniform_real_distribution<float> uniform(-bound, bound);
  for (Eigen::Index j = 0; j < a.size(); ++j) a.data()[j] = uniform(rng);
}

MatrixD RandomOrthonormal(int m, int k, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  MatrixD g(m, k);
  for (double& x : g.reshaped()) x = normal(rng);
  return ThinQr(g).q;
}

}  // namespace fedlora::common
