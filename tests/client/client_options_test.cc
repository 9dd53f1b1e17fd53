// fedlora-client's options: flags bind to ClientOptions with the documented defaults, and Validate
// refuses each bad combination saying what is wrong.
#include "client/client_options.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace fedlora::client {
namespace {

using ::testing::HasSubstr;

absl::StatusOr<ClientOptions> Parse(std::vector<std::string> args) {
  ClientOptions o;
  CLI::App app;
  AddClientFlags(app, o);
  std::reverse(args.begin(), args.end());  // CLI11 takes a reversed vector
  try {
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    return absl::InvalidArgumentError(e.what());
  }
  if (absl::Status st = o.Validate(); !st.ok()) return st;
  return o;
}

TEST(ClientOptionsTest, DefaultsAndFlags) {
  auto o = Parse({"--ca", "ca.pem", "--workload", "llm", "--model", "m", "--data", "d.jsonl",
                  "--chunk-bytes", "4096"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->coordinator, "localhost:50051");
  EXPECT_EQ(o->workload, WorkloadKind::kLlm);
  EXPECT_EQ(o->node.chunk_bytes, 4096);
  EXPECT_FALSE(o->privacy.enabled());
}

TEST(ClientOptionsTest, RefusesWhatItCannotHonourSayingWhy) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{}, "TLS needs --ca"},
      {{"--ca", "c", "--cert", "x.pem"}, "needs both --cert and --key (given: --cert)"},
      {{"--ca", "c", "--target-epsilon", "2"}, "--target-epsilon needs DP-SGD"},
      {{"--ca", "c", "--dp-noise-multiplier", "1", "--dp-clip", "0"}, "--dp-clip must be > 0"},
      {{"--ca", "c", "--workload", "command", "--dp-noise-multiplier", "1"},
       "a command workload's program must do its own"},
      {{"--ca", "c", "--workload", "command"}, "needs --train-command"},
      {{"--ca", "c", "--workload", "llm"}, "needs --model DIR and --data FILE"},
      {{"--ca", "c", "--chunk-bytes", "10"}, "--chunk-bytes is 10; use 1 KiB to 64 MiB"},
      {{"--ca", "c", "--workload", "gpu"}, "gpu"},
      {{"--ca", "c", "--cert", "o", "--key", "k", "--admin", "stop"},
       "--admin stop: expected remove, pause, resume, export or unpin"},
      {{"--ca", "c", "--cert", "o", "--key", "k", "--admin", "remove"},
       "--admin remove needs --admin-client ID"},
      {{"--ca", "c", "--cert", "o", "--key", "k", "--admin", "pause", "--admin-client", "x"},
       "--admin pause takes no --admin-client"},
      {{"--ca", "c", "--admin", "export"}, "--admin needs mutual TLS"},
  };
  for (const auto& [args, message] : cases) {
    auto o = Parse(args);
    ASSERT_FALSE(o.ok()) << message;
    EXPECT_THAT(o.status().message(), HasSubstr(message));
  }
  // --status needs no workload settings: it only asks the coordinator.
  EXPECT_TRUE(Parse({"--ca", "c", "--workload", "llm", "--status"}).ok());
  EXPECT_TRUE(Parse({"--ca", "c", "--cert", "o", "--key", "k", "--workload", "llm", "--admin",
                     "remove", "--admin-client", "client-3"})
                  .ok());
}

}  // namespace
}  // namespace fedlora::client
