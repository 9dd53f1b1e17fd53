#include "common/tensor/safetensors.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "common/base/file_util.h"
#include "tests/test_util.h"

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

// A safetensors file assembled by hand: 8-byte little-endian header length, header, data.
std::string MakeFile(const std::string& header, const std::string& data) {
  uint64_t n = header.size();
  std::string out(reinterpret_cast<const char*>(&n), 8);
  return out + header + data;
}

std::string Floats(std::initializer_list<float> v) {
  return std::string(reinterpret_cast<const char*>(std::data(v)), v.size() * 4);
}

absl::Status ParseStatus(const std::string& bytes) {
  auto view = SafetensorsView::Parse({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()},
                                     "test.st");
  return view.status();
}

TEST(SafetensorsTest, HalfConversionsMatchIeeeBinary16) {
  EXPECT_EQ(FloatToHalfBits(1.0f), 0x3C00);
  EXPECT_EQ(FloatToHalfBits(-2.0f), 0xC000);
  EXPECT_EQ(FloatToHalfBits(65504.0f), 0x7BFF);     // largest finite half
  EXPECT_EQ(FloatToHalfBits(1.0f / 3.0f), 0x3555);  // 0.333251953125, nearest
  EXPECT_EQ(FloatToHalfBits(INFINITY), 0x7C00);
  EXPECT_EQ(HalfBitsToFloat(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(HalfBitsToFloat(0x3555), 0.333251953125f);
  EXPECT_EQ(HalfBitsToFloat(0xC000), -2.0f);
}

TEST(SafetensorsTest, BFloat16ConversionsRoundToNearestEven) {
  auto bits = [](float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
  };
  auto from = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  };
  EXPECT_EQ(FloatToBFloat16Bits(1.0f), 0x3F80);
  EXPECT_EQ(FloatToBFloat16Bits(3.14159265f), 0x4049);       // low half 0x0FDB rounds down
  EXPECT_EQ(FloatToBFloat16Bits(from(0x3F808000)), 0x3F80);  // exact tie, even stays
  EXPECT_EQ(FloatToBFloat16Bits(from(0x3F818000)), 0x3F82);  // exact tie, odd rounds up
  EXPECT_EQ(FloatToBFloat16Bits(from(0x3F808001)), 0x3F81);  // just above the tie
  EXPECT_EQ(bits(BFloat16BitsToFloat(0x4049)), 0x40490000u);
}

TEST(SafetensorsTest, ReadsAHandWrittenFile) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"BF16","shape":[2],"data_offsets":[12,16]},)"
      R"("a":{"dtype":"F32","shape":[1,3],"data_offsets":[0,12]}})";
  const uint16_t bf[2] = {0x3F80, 0xC000};  // 1, -2
  std::string data =
      Floats({1.5f, -0.25f, 3.0f}) + std::string(reinterpret_cast<const char*>(bf), 4);
  std::string bytes = MakeFile(header, data);
  auto view =
      SafetensorsView::Parse({reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, "x");
  ASSERT_TRUE(view.ok()) << view.status();
  ASSERT_EQ(view->tensors().size(), 2u);
  EXPECT_EQ(view->tensors()[0].name, "a");  // data order, not header order
  EXPECT_EQ(view->metadata().at("format"), "pt");
  std::vector<float> a(3), b(2);
  view->ReadF32(*view->Find("a"), a);
  view->ReadF32(*view->Find("b"), b);
  EXPECT_THAT(a, ::testing::ElementsAre(1.5f, -0.25f, 3.0f));
  EXPECT_THAT(b, ::testing::ElementsAre(1.0f, -2.0f));
  EXPECT_EQ(view->Find("c"), nullptr);
}

TEST(SafetensorsTest, WriteThenReadRoundTripsEveryDType) {
  testing::ScratchDir dir;
  std::vector<float> x = {0.1f, -7.5f, 1e-3f, 42.0f, -0.0f, 3.0e4f};
  std::vector<float> y = {1.0f, 2.0f};
  for (DType dtype : {DType::kF32, DType::kF16, DType::kBF16}) {
    const auto path = dir / std::string(DTypeName(dtype));
    std::vector<TensorToWrite> tensors = {{"x", {2, 3}, x}, {"y", {2}, y}};
    ASSERT_TRUE(WriteSafetensors(path, tensors, dtype, {{"format", "pt"}}).ok());
    auto file = SafetensorsFile::Open(path);
    ASSERT_TRUE(file.ok()) << file.status();
    const TensorInfo* t = file->view().Find("x");
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->dtype, dtype);
    EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
    std::vector<float> back(6);
    file->view().ReadF32(*t, back);
    for (size_t i = 0; i < x.size(); ++i) {
      float expected = dtype == DType::kF32   ? x[i]
                       : dtype == DType::kF16 ? HalfBitsToFloat(FloatToHalfBits(x[i]))
                                              : BFloat16BitsToFloat(FloatToBFloat16Bits(x[i]));
      EXPECT_EQ(back[i], expected) << DTypeName(dtype) << " element " << i;
    }
    // The data section starts 8-byte aligned, as the format recommends.
    auto raw = ReadFileToString(path);
    uint64_t n;
    std::memcpy(&n, raw->data(), 8);
    EXPECT_EQ((8 + n) % 8, 0u);
  }
}

TEST(SafetensorsTest, WriteRefusesShapeThatDoesNotMatchData) {
  testing::ScratchDir dir;
  std::vector<float> x(5);
  std::vector<TensorToWrite> tensors = {{"x", {2, 3}, x}};
  absl::Status st = WriteSafetensors(dir / "x.st", tensors, DType::kF32, {});
  EXPECT_THAT(st.message(), HasSubstr("6 elements but 5"));
  EXPECT_FALSE(std::filesystem::exists(dir / "x.st"));
}

TEST(SafetensorsTest, FailedWriteLeavesNoFile) {
  testing::ScratchDir dir;
  std::vector<float> x(2);
  std::vector<TensorToWrite> tensors = {{"x", {2}, x}};
  EXPECT_FALSE(WriteSafetensors(dir / "missing" / "x.st", tensors, DType::kF32, {}).ok());
  EXPECT_TRUE(std::filesystem::is_empty(dir.path()));
}

struct BadFile {
  const char* what;
  std::string bytes;
  const char* message;
};

TEST(SafetensorsTest, EveryRuleOfTheFormatIsChecked) {
  const std::string f8 = Floats({1, 2});
  auto entry = [](const std::string& dtype, const std::string& shape, int b, int e) {
    return "{\"dtype\":\"" + dtype + "\",\"shape\":" + shape + ",\"data_offsets\":[" +
           std::to_string(b) + "," + std::to_string(e) + "]}";
  };
  std::string huge_len(8, '\0');
  uint64_t big = 1u << 20;
  std::memcpy(huge_len.data(), &big, 8);
  const std::vector<BadFile> cases = {
      {"empty file", "", "8-byte header length"},
      {"short file", "abc", "8-byte header length"},
      {"header longer than file", huge_len + "{}", "the header length field exceeds the 2 bytes"},
      {"not json", MakeFile("{nope", f8), "not valid JSON"},
      {"header not an object", MakeFile("[1,2]", f8), "JSON object"},
      {"unknown dtype", MakeFile("{\"a\":" + entry("Q7", "[2]", 0, 8) + "}", f8),
       "unknown dtype 'Q7'"},
      {"unsupported dtype", MakeFile("{\"a\":" + entry("F64", "[1]", 0, 8) + "}", f8),
       "F64 is not supported"},
      {"shape does not match bytes", MakeFile("{\"a\":" + entry("F32", "[3]", 0, 8) + "}", f8),
       "needs 12 bytes"},
      {"negative dimension", MakeFile("{\"a\":" + entry("F32", "[-2]", 0, 8) + "}", f8),
       "non-negative"},
      {"offsets past the data", MakeFile("{\"a\":" + entry("F32", "[4]", 0, 16) + "}", f8),
       "out of range"},
      {"end before begin", MakeFile("{\"a\":" + entry("F32", "[0]", 8, 4) + "}", f8),
       "end before they begin"},
      {"overlapping tensors",
       MakeFile("{\"a\":" + entry("F32", "[2]", 0, 8) + ",\"b\":" + entry("F32", "[1]", 4, 8) + "}",
                f8),
       "overlap"},
      {"gap between tensors",
       MakeFile("{\"a\":" + entry("F32", "[1]", 0, 4) + ",\"b\":" + entry("F32", "[0]", 8, 8) + "}",
                f8),
       "gap"},
      {"first tensor not at 0", MakeFile("{\"a\":" + entry("F32", "[1]", 4, 8) + "}", f8), "gap"},
      {"trailing bytes", MakeFile("{\"a\":" + entry("F32", "[1]", 0, 4) + "}", f8),
       "trailing bytes"},
      {"duplicate name",
       MakeFile("{\"a\":" + entry("F32", "[1]", 0, 4) + ",\"a\":" + entry("F32", "[1]", 4, 8) + "}",
                f8),
       "'a' appears twice"},
      {"metadata not strings",
       MakeFile("{\"__metadata__\":{\"k\":1},\"a\":" + entry("F32", "[2]", 0, 8) + "}", f8),
       "not a string"},
      {"unexpected field",
       MakeFile("{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"x\":1}}", f8),
       "unexpected field 'x'"},
      {"missing offsets", MakeFile("{\"a\":{\"dtype\":\"F32\",\"shape\":[2]}}", f8),
       "data_offsets"},
  };
  for (const BadFile& c : cases) {
    absl::Status st = ParseStatus(c.bytes);
    EXPECT_TRUE(absl::IsInvalidArgument(st)) << c.what << ": " << st;
    EXPECT_THAT(st.message(), HasSubstr(c.message)) << c.what;
    EXPECT_THAT(st.message(), HasSubstr("test.st")) << c.what << ": the message names the file";
  }
}

// Corrupting a valid file anywhere (flipped bytes, truncation) must give an error or a valid view,
// never a crash or a read outside the buffer (run under -DFEDLORA_SANITIZE=ON to have ASan watch
// the reads).
TEST(SafetensorsTest, CorruptedFilesNeverCrash) {
  testing::ScratchDir dir;
  std::vector<float> x(24, 0.5f), y(8, -1.0f);
  std::vector<TensorToWrite> tensors = {{"x", {4, 6}, x}, {"y", {8}, y}};
  ASSERT_TRUE(WriteSafetensors(dir / "ok.st", tensors, DType::kBF16, {{"format", "pt"}}).ok());
  const std::string good = *ReadFileToString(dir / "ok.st");
  std::mt19937 rng(7);
  int rejected = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bytes = good;
    if (trial % 3 == 0) {
      bytes.resize(rng() % bytes.size());
    } else {
      for (int k = 0; k < 1 + trial % 4; ++k)
        bytes[rng() % bytes.size()] ^= static_cast<char>(1 + rng() % 255);
    }
    auto view = SafetensorsView::Parse(
        {reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size()}, "fuzz");
    if (!view.ok()) {
      ++rejected;
      continue;
    }
    for (const TensorInfo& t : view->tensors()) {
      std::vector<float> out(static_cast<size_t>(t.num_elements()));
      view->ReadF32(t, out);
    }
  }
  EXPECT_GT(rejected,
            1000);  // Truncations alone are a third of the trials and all must be rejected.
}

}  // namespace
}  // namespace fedlora::common
