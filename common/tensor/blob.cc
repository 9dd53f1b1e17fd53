#include "common/tensor/blob.h"

#include <openssl/evp.h>
#include <openssl/sha.h>

#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>
#include <set>

#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

constexpr char kScalingKey[] = "fedlora.scaling";

std::span<const uint8_t> Bytes(std::string_view s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

// Reads the "fedlora.scaling" metadata: {module: scaling}.
absl::StatusOr<nlohmann::json> Scalings(const SafetensorsView& view, const std::string& origin) {
  auto it = view.metadata().find(kScalingKey);
  if (it == view.metadata().end()) return nlohmann::json::object();
  nlohmann::json j = nlohmann::json::parse(it->second, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object())
    return absl::InvalidArgumentError(
        StrCat(origin, ": metadata ", kScalingKey, " is not a JSON object"));
  return j;
}

absl::StatusOr<double> ScalingOf(const nlohmann::json& scalings, const std::string& module,
                                 const std::string& origin) {
  if (!scalings.contains(module)) return 1.0;
  const auto& v = scalings[module];
  if (!v.is_number() || !std::isfinite(v.get<double>())) {
    return absl::InvalidArgumentError(
        StrCat(origin, ": module ", module, ": scaling ", v.dump(), " is not a finite number"));
  }
  return v.get<double>();
}

// Safetensors bytes in memory. Writing into memory fails only when memory runs out.
std::string Encode(std::span<const TensorToWrite> tensors,
                   const std::map<std::string, std::string>& metadata) {
  char* buffer = nullptr;
  size_t size = 0;
  std::FILE* out = ::open_memstream(&buffer, &size);
  absl::Status st = WriteSafetensors(out, tensors, DType::kF32, metadata);
  std::fclose(out);
  std::string bytes = st.ok() ? std::string(buffer, size) : std::string();
  std::free(buffer);
  return bytes;
}

}  // namespace

std::string Sha256Hex(std::string_view bytes) { return Sha256Hex(std::span(&bytes, 1)); }

std::string Sha256Hex(std::span<const std::string_view> pieces) {
  return Sha256Hex([&](const std::function<void(std::string_view)>& sink) {
    for (std::string_view p : pieces) sink(p);
  });
}

std::string Sha256Hex(
    const std::function<void(const std::function<void(std::string_view)>&)>& feed) {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  EVP_DigestInit_ex(ctx, EVP_sha256(), nullptr);
  feed([&](std::string_view p) { EVP_DigestUpdate(ctx, p.data(), p.size()); });
  uint8_t digest[SHA256_DIGEST_LENGTH];
  EVP_DigestFinal_ex(ctx, digest, nullptr);
  EVP_MD_CTX_free(ctx);
  static const char kHex[] = "0123456789abcdef";
  std::string out;
  for (uint8_t b : digest) {
    out.push_back(kHex[b >> 4]);
    out.push_back(kHex[b & 15]);
  }
  return out;
}

bool IsSha256Hex(std::string_view s) {
  return s.size() == 64 && s.find_first_not_of("0123456789abcdef") == std::string_view::npos;
}

std::string EncodeAdapter(const Adapter& adapter, AdapterParts parts) {
  nlohmann::json scalings = nlohmann::json::object();
  for (const LoraModule& m : adapter.modules()) scalings[m.name] = m.scaling;
  return Encode(AdapterTensors(adapter, parts), {{"format", "pt"}, {kScalingKey, scalings.dump()}});
}

std::string EncodeMatrices(const std::vector<NamedMatrix>& matrices) {
  std::vector<MatrixF> values;
  values.reserve(matrices.size());
  std::vector<TensorToWrite> tensors;
  for (const NamedMatrix& m : matrices) {
    values.push_back(m.value.cast<float>());
    tensors.push_back(
        {m.name,
         {m.value.rows(), m.value.cols()},
         std::span<const float>(values.back().data(), static_cast<size_t>(values.back().size()))});
  }
  return Encode(tensors, {});
}

absl::StatusOr<std::vector<MatrixD>> DecodeMatrices(std::string_view bytes,
                                                    const std::string& origin,
                                                    const std::vector<MatrixShape>& expected) {
  ASSIGN_OR_RETURN(SafetensorsView view, SafetensorsView::Parse(Bytes(bytes), origin));
  if (view.tensors().size() != expected.size()) {
    return absl::InvalidArgumentError(StrCat(origin, " holds ", view.tensors().size(),
                                             " tensors, expected ", expected.size(),
                                             " (one per module)"));
  }
  std::vector<MatrixD> out;
  for (const MatrixShape& e : expected) {
    const TensorInfo* t = view.Find(e.name);
    if (t == nullptr) return absl::InvalidArgumentError(StrCat(origin, " has no tensor ", e.name));
    if (t->shape != std::vector<int64_t>{e.rows, e.cols}) {
      return absl::InvalidArgumentError(StrCat(origin, ": ", e.name, " has shape ",
                                               ShapeString(t->shape), ", expected [", e.rows, ",",
                                               e.cols, "]"));
    }
    MatrixF value(e.rows, e.cols);
    view.ReadF32(*t, {value.data(), static_cast<size_t>(value.size())});
    if (!value.allFinite())
      return absl::InvalidArgumentError(
          StrCat(origin, ": ", e.name, " has a value that is not finite"));
    out.push_back(value.cast<double>());
  }
  return out;
}

absl::StatusOr<Adapter> DecodeAdapter(std::string_view bytes, const std::string& origin,
                                      Adapter reuse) {
  ASSIGN_OR_RETURN(SafetensorsView view, SafetensorsView::Parse(Bytes(bytes), origin));
  ASSIGN_OR_RETURN(nlohmann::json scalings, Scalings(view, origin));
  return AdapterFromSafetensors(
      view, origin, [&](const ModuleShape& s) { return ScalingOf(scalings, s.name, origin); },
      std::move(reuse));
}

absl::StatusOr<Adapter> DecodeROnto(std::string_view bytes, const std::string& origin,
                                    const Adapter& frozen, Adapter reuse) {
  ASSIGN_OR_RETURN(SafetensorsView view, SafetensorsView::Parse(Bytes(bytes), origin));
  ASSIGN_OR_RETURN(nlohmann::json scalings, Scalings(view, origin));
  Adapter out = std::move(reuse);
  out = frozen;  // copied into `reuse`'s buffer where it is large enough
  out.source = origin;
  std::set<std::string> seen;
  for (const TensorInfo& t : view.tensors()) {
    const std::string prefix = "base_model.model.", suffix = ".lora_R.weight";
    const bool named = t.name.starts_with(prefix) && t.name.ends_with(suffix) &&
                       t.name.size() > prefix.size() + suffix.size();
    const std::string module =
        named ? t.name.substr(prefix.size(), t.name.size() - prefix.size() - suffix.size()) : "";
    auto i = named ? out.FindModule(module) : std::nullopt;
    if (!i) {
      return absl::InvalidArgumentError(
          StrCat(origin, ": unexpected tensor '", t.name,
                 "'; a fed-sb update holds one base_model.model.<module>.lora_R.weight "
                 "per module of the task"));
    }
    const int r = out.module(*i).rank;
    if (t.shape != std::vector<int64_t>{r, r}) {
      return absl::InvalidArgumentError(StrCat(origin, ": module ", module, ": lora_R has shape ",
                                               ShapeString(t.shape), ", task says [", r, ",", r,
                                               "]"));
    }
    view.ReadF32(t, {out.R(*i).data(), static_cast<size_t>(r) * r});
    ASSIGN_OR_RETURN(double s, ScalingOf(scalings, module, origin));
    out.set_scaling(*i, s);
    seen.insert(module);
  }
  for (const LoraModule& m : out.modules()) {
    if (!seen.count(m.name))
      return absl::InvalidArgumentError(StrCat(origin, ": module ", m.name, " has no lora_R"));
  }
  return out;
}

}  // namespace fedlora::common
