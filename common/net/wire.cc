#include "common/net/wire.h"

#include "common/base/strings.h"

namespace fedlora::common {

namespace v1 = ::fedlora::v1;

v1::Method ToWire(Method method) {
  switch (method) {
    case Method::kFedIt:
      return v1::METHOD_FEDIT;
    case Method::kFlora:
      return v1::METHOD_FLORA;
    case Method::kLoraFair:
      return v1::METHOD_LORA_FAIR;
    case Method::kFedSb:
      return v1::METHOD_FED_SB;
  }
  return v1::METHOD_UNSPECIFIED;
}

v1::BlobKind ToWire(BlobKind kind) {
  switch (kind) {
    case BlobKind::kAdapter:
      return v1::BLOB_KIND_ADAPTER;
    case BlobKind::kDelta:
      return v1::BLOB_KIND_DELTA;
    case BlobKind::kFrozen:
      return v1::BLOB_KIND_FROZEN;
    case BlobKind::kR:
      return v1::BLOB_KIND_R;
    case BlobKind::kBasis:
      return v1::BLOB_KIND_BASIS;
  }
  return v1::BLOB_KIND_UNSPECIFIED;
}

absl::StatusOr<Method> FromWire(v1::Method method) {
  for (Method m : kAllMethods)
    if (ToWire(m) == method) return m;
  return absl::InvalidArgumentError(
      StrCat("method ", static_cast<int>(method),
             " is not one this program knows (fedit, flora, lora-fair, fed-sb); is the other side "
             "of another version?"));
}

absl::StatusOr<BlobKind> FromWire(v1::BlobKind kind) {
  for (BlobKind k :
       {BlobKind::kAdapter, BlobKind::kDelta, BlobKind::kFrozen, BlobKind::kR, BlobKind::kBasis})
    if (ToWire(k) == kind) return k;
  return absl::InvalidArgumentError(StrCat("blob kind ", static_cast<int>(kind),
                                           " is not one this program knows; is the coordinator "
                                           "of another version?"));
}

std::string MethodNameOf(v1::Method method) {
  const absl::StatusOr<Method> m = FromWire(method);
  return m.ok() ? std::string(MethodName(*m)) : StrCat("unknown method ", static_cast<int>(method));
}

}  // namespace fedlora::common
