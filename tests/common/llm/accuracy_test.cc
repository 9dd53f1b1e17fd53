// Answer extraction as LLM-Adapters' commonsense_evaluate.py and evaluate.py score responses, on
// the answer formats of its datasets.
#include "common/llm/accuracy.h"

#include <gtest/gtest.h>

namespace fedlora::common {
namespace {

TEST(AccuracyTest, ChoicesComeFromTheAnswerFormatLine) {
  EXPECT_EQ(AnswerChoices("Question?\n\nAnswer format: answer1/answer2/answer3/answer4"),
            (std::vector<std::string>{"answer1", "answer2", "answer3", "answer4"}));
  // WinoGrande's puts it on the options' line.
  EXPECT_EQ(
      AnswerChoices("Fill _.\n\nOption1: Sarah Option2: Maria Answer format: option1/option2"),
      (std::vector<std::string>{"option1", "option2"}));
  EXPECT_EQ(AnswerChoices("with true or false\n\nAnswer format: true/false"),
            (std::vector<std::string>{"true", "false"}));
  EXPECT_TRUE(AnswerChoices("What is 3 plus 4?").empty());
}

TEST(AccuracyTest, ExtractsAsLlmAdaptersDoes) {
  const std::vector<std::string> boolq = {"true", "false"}, piqa = {"solution1", "solution2"},
                                 arc = {"answer1", "answer2", "answer3", "answer4", "answer5"},
                                 wino = {"option1", "option2"},
                                 hellaswag = {"ending1", "ending2", "ending3", "ending4"};
  EXPECT_TRUE(AnswerIsCorrect("the correct answer is true", boolq, "true"));
  EXPECT_FALSE(AnswerIsCorrect("the correct answer is false", boolq, "true"));
  // The first choice in the text, whatever comes after.
  EXPECT_TRUE(AnswerIsCorrect("the correct answer is answer3, not answer1", arc, "answer3"));
  EXPECT_TRUE(AnswerIsCorrect("the correct answer is solution2", piqa, "solution2"));
  EXPECT_TRUE(AnswerIsCorrect("option1", wino, "option1"));
  EXPECT_TRUE(AnswerIsCorrect("the correct answer is ending4", hellaswag, "ending4"));
  // Inside a word still counts, as re.findall finds it; case matters, as in the reference.
  EXPECT_TRUE(AnswerIsCorrect("untrue", boolq, "true"));
  EXPECT_FALSE(AnswerIsCorrect("True", boolq, "true"));
  // No choice named: wrong.
  EXPECT_FALSE(AnswerIsCorrect("the correct answer is", arc, "answer1"));
  EXPECT_EQ(ExtractAnswer("I pick answer2", arc, "answer1"), "answer2");
  EXPECT_EQ(ExtractAnswer("none", arc, "answer1"), std::nullopt);

  // Numbers (math): the last one, commas removed, within 0.001.
  EXPECT_TRUE(AnswerIsCorrect("5 + 7 = 12. The answer is 1,234.5", {}, "1234.5"));
  EXPECT_TRUE(AnswerIsCorrect("so -3.0004", {}, "-3"));
  EXPECT_FALSE(AnswerIsCorrect("so -3.002", {}, "-3"));
  EXPECT_FALSE(AnswerIsCorrect("the answer is 12, then 13", {}, "12"));
  EXPECT_FALSE(AnswerIsCorrect("no number here", {}, "12"));
  EXPECT_EQ(ExtractAnswer("it is 42.", {}, "42"), "42.");
  // Other answers: the whole response, trimmed.
  EXPECT_TRUE(AnswerIsCorrect("  RETTUB\n", {}, "RETTUB"));
  EXPECT_FALSE(AnswerIsCorrect("RETTUB!", {}, "RETTUB"));
  EXPECT_FALSE(AnswerIsCorrect("3 15 40", {}, "3 15 40 77"));
}

TEST(AccuracyTest, PerTaskCountsEachTasksRecordsOnly) {
  const std::vector<AnswerRecord> records = {
      {{}, {}, "a", "boolq"}, {{}, {}, "a", "boolq"}, {{}, {}, "a", "arc"}, {{}, {}, "a", ""}};
  AccuracyResult result;
  result.responses = {"a", "b", "a", "a"};
  result.is_correct = {true, false, true, true};
  result.correct = 3;
  const auto by_task = AccuracyByTask(records, result);
  EXPECT_EQ(by_task, (std::map<std::string, double>{{"arc", 1.0}, {"boolq", 0.5}}));
}

}  // namespace
}  // namespace fedlora::common
