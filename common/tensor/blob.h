// Blobs: adapters as they travel and as the coordinator stores them — safetensors bytes with PEFT
// tensor names, named by their sha256. Metadata "fedlora.scaling" holds the adapter's per-module
// scaling (JSON object).
#ifndef FEDLORA_COMMON_TENSOR_BLOB_H_
#define FEDLORA_COMMON_TENSOR_BLOB_H_

#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/tensor/adapter.h"
#include "common/tensor/eigen_types.h"
#include "common/tensor/peft.h"

namespace fedlora::common {

std::string Sha256Hex(std::string_view bytes);
// The sha256 of the pieces' bytes, concatenated in order.
std::string Sha256Hex(std::span<const std::string_view> pieces);
// The same, fed piece by piece: Sha256Hex(std::function) calls `feed` with a sink for the pieces.
std::string Sha256Hex(
    const std::function<void(const std::function<void(std::string_view)>&)>& feed);
// 64 lower-case hex digits, as Sha256Hex writes them.
bool IsSha256Hex(std::string_view s);

// The adapter (all tensors, or only R) as safetensors bytes (f32).
std::string EncodeAdapter(const Adapter& adapter, AdapterParts parts = AdapterParts::kAll);

// A blob holding A and B (and R where present), validated as any safetensors file; the scalings
// come from the metadata (1 when absent). `origin` names the blob in errors. Both decoders take
// `reuse`'s memory for the result where it is large enough (Adapter::Create).
absl::StatusOr<Adapter> DecodeAdapter(std::string_view bytes, const std::string& origin,
                                      Adapter reuse = {});

// A Fed-SB update (R only) put onto the shared frozen B and A of `frozen`: the result is `frozen`
// with the blob's R and scaling. The blob must hold exactly one [r, r] lora_R per module of
// `frozen`.
absl::StatusOr<Adapter> DecodeROnto(std::string_view bytes, const std::string& origin,
                                    const Adapter& frozen, Adapter reuse = {});

// Named matrices as safetensors bytes (f32, one [rows, cols] tensor per name, in order): the
// products and bases of Fed-SB's initialisation.
struct NamedMatrix {
  std::string name;
  MatrixD value;
};
std::string EncodeMatrices(const std::vector<NamedMatrix>& matrices);

// The matrices of a blob, in the order of `expected`, whose names and shapes (values ignored) it
// must match exactly, every value finite; INVALID_ARGUMENT naming `origin` and what differs.
struct MatrixShape {
  std::string name;
  int64_t rows = 0, cols = 0;
};
absl::StatusOr<std::vector<MatrixD>> DecodeMatrices(std::string_view bytes,
                                                    const std::string& origin,
                                                    const std::vector<MatrixShape>& expected);

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_TENSOR_BLOB_H_
