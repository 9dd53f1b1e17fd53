#include "common/tensor/adapter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/tensor/blob.h"
#include "tests/test_util.h"

namespace fedlora::common {
namespace {

using ::testing::HasSubstr;

TEST(AdapterTest, ModulesAreLaidOutBackToBackInOneBuffer) {
  auto a = Adapter::Create({{"q", 2, 3, 4, 1.0, false}, {"v", 1, 5, 2, 1.0, true}});
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->values().size(), 2u * 3 + 4 * 2 + (1 * 5 + 2 * 1 + 1 * 1));
  EXPECT_EQ(a->module(1).a_offset, 14u);
  EXPECT_EQ(a->module(1).b_offset, 19u);
  EXPECT_EQ(a->module(1).r_offset, 21u);
  a->B(0)(3, 1) = 7;  // row-major [m, r]: element (3, 1) is flat index a_offset_B + 3·r + 1
  EXPECT_EQ(a->values()[6 + 3 * 2 + 1], 7.0f);
  EXPECT_EQ(*a->FindModule("v"), 1u);
  EXPECT_FALSE(a->FindModule("k").has_value());
}

TEST(AdapterTest, CreateRefusesBadShapes) {
  EXPECT_THAT(Adapter::Create({{"q", 0, 3, 4, 1.0, false}}).status().message(),
              HasSubstr("must all be in [1, 4194304]"));
  EXPECT_THAT(Adapter::Create({{"q", 1, 3, kMaxFeatures + 1, 1.0, false}}).status().message(),
              HasSubstr("must all be in [1, 4194304]"));
  // Names end up in safetensors headers and JSON state files: UTF-8, and not absurdly long.
  EXPECT_THAT(Adapter::Create({{"", 1, 3, 4, 1.0, false}}).status().message(),
              HasSubstr("a module name of 0 bytes"));
  EXPECT_THAT(Adapter::Create({{std::string(kMaxModuleName + 1, 'q'), 1, 3, 4, 1.0, false}})
                  .status()
                  .message(),
              HasSubstr("a module name of 4097 bytes; expected 1 to 4096"));
  EXPECT_THAT(Adapter::Create({{"model.ml\x94.down_proj", 1, 3, 4, 1.0, false}}).status().message(),
              HasSubstr("a module name of 19 bytes is not UTF-8"));
  EXPECT_THAT(
      Adapter::Create({{"q", 1, 3, 4, 1.0, false}, {"q", 1, 3, 4, 1.0, false}}).status().message(),
      HasSubstr("appears twice"));
}

TEST(AdapterTest, DeltaNormEqualsTheDenseNorm) {
  Adapter a = testing::RandomAdapter({{"q", 3, 17, 11, 2.5}, {"v", 4, 9, 13, 0.5, true}}, 4);
  for (size_t i = 0; i < 2; ++i)
    EXPECT_NEAR(a.DeltaNorm(i), testing::DenseDelta(a, i).norm(), 1e-9 * a.DeltaNorm(i));
}

TEST(AdapterTest, CheckFiniteNamesModuleAndTensor) {
  Adapter a = testing::RandomAdapter({{"q", 3, 4, 5}, {"v", 2, 4, 5, 1.0, true}}, 4);
  EXPECT_TRUE(a.CheckFinite().ok());
  a.R(1)(1, 1) = -INFINITY;
  EXPECT_THAT(a.CheckFinite().message(),
              HasSubstr("module v: lora_R holds a non-finite value (-inf)"));
}

// An adapter handed to Create or a decoder as `reuse` lends its memory: the result is what a fresh
// decode gives (zeros from Create, the blob's values from a decoder, whatever `reuse` held), in
// `reuse`'s buffer when it is large enough and in new memory when it is not.
TEST(AdapterTest, ReusedMemoryHoldsExactlyWhatAFreshAdapterWould) {
  const std::vector<testing::ModuleSpec> specs = {{"q", 3, 17, 11, 2.0, true},
                                                  {"v", 2, 9, 13, 2.0, true}};
  const Adapter update = testing::RandomAdapter(specs, 7);
  const std::vector<ModuleShape> shapes(update.modules().begin(), update.modules().end());
  Adapter junk = testing::RandomAdapter(specs, 8);  // its values must not survive
  const auto values = [](const Adapter& a) {
    return std::vector<float>(a.values().begin(), a.values().end());
  };
  const float* memory = junk.values().data();
  auto zero = Adapter::Create(shapes, std::move(junk));
  ASSERT_TRUE(zero.ok());
  EXPECT_EQ(zero->values().data(), memory);
  EXPECT_EQ(values(*zero), std::vector<float>(zero->values().size(), 0.0f));

  auto decoded = DecodeAdapter(EncodeAdapter(update), "update", *std::move(zero));
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(decoded->values().data(), memory);
  EXPECT_EQ(values(*decoded), values(update));
  EXPECT_EQ(decoded->module(1).scaling, 2.0);

  // Fed-SB: the frozen A and B with the blob's R, over a spare holding another update.
  const Adapter frozen = testing::RandomAdapter(specs, 9);
  auto onto =
      DecodeROnto(EncodeAdapter(update, AdapterParts::kROnly), "r", frozen, *std::move(decoded));
  ASSERT_TRUE(onto.ok()) << onto.status();
  EXPECT_EQ(onto->values().data(), memory);
  EXPECT_EQ(onto->A(1), frozen.A(1));
  EXPECT_EQ(onto->B(0), frozen.B(0));
  EXPECT_EQ(onto->R(0), update.R(0));
  EXPECT_EQ(onto->R(1), update.R(1));

  // Too small to hold the result: new memory, same values.
  Adapter small = testing::RandomAdapter({{"q", 1, 2, 2}}, 1);
  auto grown = DecodeAdapter(EncodeAdapter(update), "update", std::move(small));
  ASSERT_TRUE(grown.ok()) << grown.status();
  EXPECT_EQ(values(*grown), values(update));
}

}  // namespace
}  // namespace fedlora::common
