// The safetensors reader and the adapter decoders behind every upload and every PEFT file: any
// bytes either parse into tensors whose every element can be read, or are refused with a status.
// A decoded adapter re-encodes to bytes that decode to the same values (the wire format is
// lossless for what the reader accepts).
#include <cstdint>
#include <span>
#include <string>

#include "common/tensor/blob.h"
#include "common/tensor/peft.h"
#include "common/tensor/safetensors.h"
#include "tests/fuzz/fuzz_util.h"

using namespace fedlora::common;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::span<const uint8_t> bytes(data, size);
  auto view = SafetensorsView::Parse(bytes, "fuzz");
  if (view.ok()) {
    for (const TensorInfo& t : view->tensors()) {
      FUZZ_CHECK(t.end - t.begin == static_cast<uint64_t>(t.num_elements()) * DTypeSize(t.dtype));
      std::vector<float> values(static_cast<size_t>(t.num_elements()));
      view->ReadF32(t, values);
    }
  }
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  auto adapter = DecodeAdapter(text, "fuzz");
  if (adapter.ok()) {
    FUZZ_CHECK(view.ok());
    auto again = DecodeAdapter(EncodeAdapter(*adapter), "re-encoded");
    FUZZ_CHECK(again.ok());
    FUZZ_CHECK(again->num_modules() == adapter->num_modules());
    for (size_t i = 0; i < adapter->values().size(); ++i) {
      const float x = adapter->values()[i], y = again->values()[i];
      FUZZ_CHECK(x == y || (x != x && y != y));
    }
    // The same bytes as a Fed-SB update onto the adapter itself (R only is expected; A and B are
    // refused).
    auto onto = DecodeROnto(text, "fuzz", *adapter);
    (void)onto;
  }
  return 0;
}
