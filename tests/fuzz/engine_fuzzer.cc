// The coordinator's round engine (server/round_engine.h, no gRPC) driven by a sequence of requests
// decoded from the input — joins with any example count and module list, chunked uploads that are
// honest, corrupted, truncated, out of order, oversized or for the wrong round, heartbeats, leaves,
// downloads, clock advances, and write failures of the test Env — against a real state directory.
// Invariants: no crash; every request answers; the engine gives up only after a write failed; and
// every committed global adapter is finite (what an honest client downloads next).
#include <fuzzer/FuzzedDataProvider.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdint>
#include <string>

#include "common/tensor/blob.h"
#include "tests/fuzz/fuzz_util.h"
#include "tests/server/engine_harness.h"

namespace ft = fedlora::testing;
namespace v1 = fedlora::v1;
using fedlora::common::Method;

namespace {

constexpr int kClients = 4;
constexpr Method kMethods[] = {Method::kFedIt, Method::kFlora, Method::kLoraFair, Method::kFedSb};

std::string Id(int i) { return "c" + std::to_string(i); }

// Checks every global adapter and FLoRA delta the task downloads. (This compared the kind with
// "global", a name no blob had, so it checked nothing until kinds became enums.)
void CheckGlobalFinite(ft::Harness& h, const v1::Task& task) {
  for (const v1::BlobRef& b : task.downloads()) {
    if (b.kind() != v1::BLOB_KIND_ADAPTER && b.kind() != v1::BLOB_KIND_DELTA) continue;
    auto bytes = h.Fetch("c0", b);
    if (!bytes.ok()) continue;  // c0 may not have joined
    auto global = fedlora::common::DecodeAdapter(*bytes, "global");
    FUZZ_CHECK(global.ok());
    FUZZ_CHECK(global->CheckFinite().ok());
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  spdlog::set_level(spdlog::level::off);  // the engine's log lines would be most of the time spent
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  static int run = 0;
  const auto dir = fedlora::fuzz::ScratchDir() / ("state" + std::to_string(run++));
  ft::TestEnv env;
  auto options = ft::TestOptions(dir, "fedit");
  options.method = in.PickValueInArray(kMethods);
  options.min_clients = 2;
  options.rounds = 2;
  options.chunk_bytes = 1024;
  options.max_wait_ms = 0;
  options.max_update_bytes = 1 << 14;
  options.max_client_examples = 1000;
  const bool norm_bounds =
      in.ConsumeBool();  // both bounds from one choice: the seeds decode as before
  options.max_update_norm = norm_bounds ? 50 : 0;
  options.max_update_norm_ratio = norm_bounds ? 4 : 0;
  ft::Harness h(options, &env);
  FUZZ_CHECK(h.Start().ok());
  bool write_failed = false;
  v1::Task last[kClients];
  for (int step = 0; step < 64 && in.remaining_bytes() > 0; ++step) {
    const int c = in.ConsumeIntegralInRange(0, kClients - 1);
    const std::string id = Id(c);
    switch (in.ConsumeIntegralInRange(0, 9)) {
      case 0: {  // join, maybe with a module of the fuzzer's shape
        if (in.ConsumeBool()) {
          ft::Modules m = ft::kModules;
          std::get<1>(m[0]) = in.ConsumeIntegralInRange(0, 40);
          std::get<0>(m[1]) = in.ConsumeRandomLengthString(64);
          h.set_modules(m);
        } else {
          h.set_modules(ft::kModules);
        }
        (void)h.Join(id, in.ConsumeIntegral<int64_t>());
        h.set_modules(ft::kModules);
        break;
      }
      case 1:
      case 2: {  // ask for a task and, for TRAIN or SKETCH, answer honestly
        auto task = h.Task(id, in.ConsumeIntegralInRange<int64_t>(-1, 3));
        if (!task.ok()) break;
        last[c] = *task;
        CheckGlobalFinite(h, *task);
        if (task->kind() == v1::Task::SKETCH) {
          h.set_gradient([](const std::string&, size_t i) {
            const auto& [name, n, m] = ft::kModules[i];
            return fedlora::common::MatrixD::Ones(m, n);
          });
          auto answer = h.SketchAnswer(id, *task);
          if (answer.ok()) (void)h.Send(id, *task, *answer);
        } else if (task->kind() == v1::Task::TRAIN) {
          auto update = h.MakeUpdate(id, *task);
          if (update.ok()) (void)h.Send(id, *task, h.Encode(*update));
        }
        break;
      }
      case 3: {  // an update for the last task, corrupted, truncated or with a hostile claim
        auto update = h.MakeUpdate(id, last[c]);
        if (!update.ok()) break;
        std::string bytes = h.Encode(*update);
        if (in.ConsumeBool() && !bytes.empty()) {
          bytes[in.ConsumeIntegralInRange<size_t>(0, bytes.size() - 1)] ^=
              static_cast<char>(in.ConsumeIntegralInRange(1, 255));
        }
        if (in.ConsumeBool()) {  // values scaled: within or far past the norm bound
          for (float& x : update->values()) x *= 1000.0f;
          bytes = h.Encode(*update);
        }
        const int64_t upto =
            in.ConsumeBool() ? in.ConsumeIntegralInRange<int64_t>(0, bytes.size()) : -1;
        (void)h.Send(id, last[c], bytes, upto, in.ConsumeIntegral<int64_t>());
        break;
      }
      case 4: {  // one raw chunk: any round, version, offset, size, hash and bytes
        v1::UploadRequest r;
        r.set_round(in.ConsumeIntegralInRange<int64_t>(-1, 4));
        r.set_state_version(in.ConsumeIntegralInRange<int64_t>(-1, 4));
        const std::string chunk = in.ConsumeRandomLengthString(600);
        r.set_sha256(in.ConsumeBool() ? fedlora::common::Sha256Hex(chunk)
                                      : in.ConsumeRandomLengthString(70));
        r.set_total_size(in.ConsumeBool() ? static_cast<int64_t>(chunk.size())
                                          : in.ConsumeIntegral<int64_t>());
        r.set_offset(in.ConsumeBool() ? 0 : in.ConsumeIntegral<int64_t>());
        r.set_data(chunk);
        r.set_num_examples(in.ConsumeIntegral<int64_t>());
        r.set_sketch_step(in.ConsumeIntegralInRange<int32_t>(-1, 5));
        (void)h.engine().Upload(id, r);
        break;
      }
      case 5: {
        v1::HeartbeatRequest r;
        r.set_round(in.ConsumeIntegralInRange<int64_t>(-1, 4));
        (void)h.engine().Heartbeat(id, r);
        break;
      }
      case 6: {
        v1::LeaveRequest r;
        r.set_round(in.ConsumeIntegralInRange<int64_t>(-1, 4));
        r.set_reason(in.ConsumeRandomLengthString(32));
        (void)h.engine().Leave(id, r);
        break;
      }
      case 7: {
        v1::DownloadRequest r;
        r.set_sha256(last[c].downloads_size() > 0 ? last[c].downloads(0).sha256() : "x");
        r.set_offset(in.ConsumeIntegral<int64_t>());
        r.set_max_bytes(in.ConsumeIntegral<int64_t>());
        (void)h.engine().Download(id, r);
        break;
      }
      case 8:  // time passes: deadlines, timeouts, retries
        env.Advance(std::chrono::duration<double>(in.ConsumeFloatingPointInRange(0.0, 700.0)));
        h.Tick();
        break;
      case 9:  // the disk fails the n-th write from now (and maybe every one after), or heals
        if (in.ConsumeBool()) {
          env.FailWrite(in.ConsumeIntegralInRange(1, 8), ENOSPC, in.ConsumeBool());
          write_failed = true;
        } else {
          env.Heal();
        }
        break;
    }
    (void)h.engine().GetStatus();
    FUZZ_CHECK(write_failed || h.engine().failed().ok());
  }
  h.Stop();
  std::error_code ec;
  std::filesystem::remove_all(dir, ec);
  return 0;
}
