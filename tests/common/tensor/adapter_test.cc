#include "common/tensor/adapter.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

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

}  // namespace
}  // namespace fedlora::common
