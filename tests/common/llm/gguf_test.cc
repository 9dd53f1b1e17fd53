#include "common/llm/gguf.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <string>
#include <vector>

namespace fedlora::common {
namespace {

// Builds the expected bytes by hand, field by field, as GGUF's specification lays them out.
class LittleEndianBytes {
 public:
  LittleEndianBytes& U32(uint32_t v) { return Raw(&v, 4); }
  LittleEndianBytes& U64(uint64_t v) { return Raw(&v, 8); }
  LittleEndianBytes& F32(float v) { return Raw(&v, 4); }
  LittleEndianBytes& Str(const std::string& s) {
    U64(s.size());
    s_ += s;
    return *this;
  }
  LittleEndianBytes& Zeros(size_t n) {
    s_.append(n, '\0');
    return *this;
  }
  const std::string& str() const { return s_; }

 private:
  LittleEndianBytes& Raw(const void* p, size_t n) {
    s_.append(static_cast<const char*>(p), n);
    return *this;
  }
  std::string s_;
};

std::string WriteToString(const GgufWriter& gguf) {
  std::FILE* f = std::tmpfile();
  EXPECT_TRUE(gguf.Write(f).ok());
  std::string out(static_cast<size_t>(std::ftell(f)), '\0');
  std::rewind(f);
  EXPECT_EQ(std::fread(out.data(), 1, out.size(), f), out.size());
  std::fclose(f);
  return out;
}

TEST(GgufWriterTest, LaysOutHeaderMetadataTableAndAlignedDataAsTheSpecificationSays) {
  const std::vector<float> matrix = {1, 2, 3, 4, 5, 6};  // 2 rows of 3
  const std::vector<float> vector = {0.5f};
  GgufWriter gguf;
  gguf.Set("general.architecture", std::string("llama"));
  gguf.Set("llama.block_count", uint32_t{2});
  gguf.Set("tokenizer.ggml.tokens", std::vector<std::string>{"a", "bc"});
  gguf.Set("llama.block_count", uint32_t{3});  // set again: keeps its place, takes the new value
  ASSERT_TRUE(gguf.AddTensor("m.weight", {2, 3}, matrix, GgmlType::kF32).ok());
  ASSERT_TRUE(gguf.AddTensor("v", {1}, vector, GgmlType::kF32).ok());

  LittleEndianBytes want;
  want.U32(0x46554747).U32(3).U64(2).U64(3);  // "GGUF", version 3, 2 tensors, 3 keys
  want.Str("general.architecture").U32(8).Str("llama");
  want.Str("llama.block_count").U32(4).U32(3);
  want.Str("tokenizer.ggml.tokens").U32(9).U32(8).U64(2).Str("a").Str("bc");
  // Dimensions innermost first: [3, 2] for PyTorch's [2, 3]; offsets from the data section.
  want.Str("m.weight").U32(2).U64(3).U64(2).U32(0).U64(0);
  want.Str("v").U32(1).U64(1).U32(0).U64(32);  // 24 bytes, padded to 32
  want.Zeros((32 - want.str().size() % 32) % 32);
  for (float x : matrix) want.F32(x);
  want.Zeros(8);
  want.F32(0.5f).Zeros(28);
  EXPECT_EQ(WriteToString(gguf), want.str());
}

TEST(GgufWriterTest, EncodesF16Bf16AndQ8_0AsGgmlDoes) {
  std::string out;
  EncodeGgmlRow(GgmlType::kF16, std::vector<float>{1.0f, -2.0f}, out);
  EXPECT_EQ(out, std::string("\x00\x3c\x00\xc0", 4));  // IEEE half: 0x3C00, 0xC000
  out.clear();
  EncodeGgmlRow(GgmlType::kBF16, std::vector<float>{1.0f, -2.0f}, out);
  EXPECT_EQ(out, std::string("\x80\x3f\x00\xc0", 4));  // the top halves of the f32s
  // Q8_0: one block, d = max|x| / 127 stored as f16, then round(x / d) as int8.
  std::vector<float> block(32);
  for (int j = 0; j < 32; ++j) block[j] = static_cast<float>(j - 16) / 4;  // −4 … 3.75
  out.clear();
  EncodeGgmlRow(GgmlType::kQ8_0, block, out);
  ASSERT_EQ(out.size(), 34u);
  ASSERT_EQ(GgmlRowBytes(GgmlType::kQ8_0, 32), 34);
  uint16_t d_bits;
  std::memcpy(&d_bits, out.data(), 2);
  // 4/127 = 0.0314961 = (1 + 8.06/1024)·2^-5: exponent 10, mantissa 8 — 0x2808, by hand.
  EXPECT_EQ(d_bits, 0x2808);
  for (int j = 0; j < 32; ++j) {
    const int want = static_cast<int>(std::lround((j - 16) / 4.0 * 127 / 4));
    EXPECT_EQ(static_cast<int8_t>(out[2 + j]), want) << j;
  }
}

TEST(GgufWriterTest, RefusesWhatLlamaCppCouldNotRead) {
  const std::vector<float> values(40, 1.0f);
  GgufWriter gguf;
  EXPECT_FALSE(gguf.AddTensor(std::string(64, 'x'), {40}, values, GgmlType::kF32).ok());
  EXPECT_FALSE(gguf.AddTensor("t", {4, 11}, values, GgmlType::kF32).ok());  // 44 ≠ 40 values
  const absl::Status q8 = gguf.AddTensor("t", {2, 20}, values, GgmlType::kQ8_0);
  EXPECT_NE(q8.message().find("rows of 20 values cannot be Q8_0"), std::string::npos) << q8;
  ASSERT_TRUE(gguf.AddTensor("t", {40}, values, GgmlType::kF32).ok());
  EXPECT_FALSE(gguf.AddTensor("t", {40}, values, GgmlType::kF32).ok());  // twice
  EXPECT_EQ(gguf.num_tensors(), 1u);
  EXPECT_EQ(ParseGgmlType("q4_k").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace fedlora::common
