// A federation inside one test process: the real RoundEngine over a real state directory, with the
// test Env (tests/test_env.h) for its writes and clock, and clients that are plain function calls —
// no processes, no sockets, no sleeps. A client's update is a deterministic function of its id and
// the round (so a redone round, or a restarted coordinator, sees the same updates), and the tests
// compute what the engine must produce from those updates independently.
#ifndef FEDLORA_TESTS_SERVER_ENGINE_HARNESS_H_
#define FEDLORA_TESTS_SERVER_ENGINE_HARNESS_H_

#include <gtest/gtest.h>

#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/aggregation/sketch.h"
#include "common/base/strings.h"
#include "common/tensor/blob.h"
#include "server/round/engine.h"
#include "tests/test_env.h"

namespace fedlora::testing {

namespace v1 = ::fedlora::v1;
using common::Adapter;

inline const std::string kBaseSha(64, 'a');
inline constexpr int kRank = 4;
inline constexpr double kAlpha = 8;  // client scaling s = 2

// The modules test clients offer by default: (name, n, m).
using Modules = std::vector<std::tuple<std::string, int, int>>;
inline const Modules kModules = {{"model.layers.0.self_attn.q_proj", 12, 16},
                                 {"model.layers.0.self_attn.v_proj", 12, 8}};

inline server::ServerOptions TestOptions(const std::filesystem::path& state_dir,
                                         const std::string& method) {
  server::ServerOptions o;
  o.method = *common::ParseMethod(method);
  o.rounds = 2;
  o.state_dir = state_dir.string();
  o.min_clients = 3;
  o.rank = kRank;
  o.lora_alpha = kAlpha;
  o.insecure = true;
  o.round_deadline_s = 60;
  o.client_timeout_s = 20;
  o.chunk_bytes = 1024;
  o.fed_sb_init = "random";  // fed_sb_init_test.cc covers the initialisation from gradients
  return o;
}

class Harness {
 public:
  Harness(server::ServerOptions options, TestEnv* env) : options_(std::move(options)), env_(env) {}

  // `evaluator`: the base model's side of the follow-up (none by default). With `wait` false, calls
  // do not wait for the follow-up to catch up (a test that holds it).
  absl::Status Start(std::unique_ptr<server::Evaluator> evaluator = nullptr, bool wait = true) {
    engine_.reset();
    wait_ = wait;
    auto engine = server::RoundEngine::Create(options_, env_, std::move(evaluator));
    if (!engine.ok()) return engine.status();
    engine_ = *std::move(engine);
    WaitForFollowUp();  // what a restart writes again
    return absl::OkStatus();
  }
  void WaitForFollowUp() {
    if (wait_) engine_->WaitForFollowUp();
  }
  void Stop() { engine_.reset(); }
  void set_modules(Modules modules) { modules_ = std::move(modules); }
  // Fed-SB's initialisation: what client `id` answers is computed from this gradient of its, per
  // module index.
  void set_gradient(std::function<common::MatrixD(const std::string& id, size_t module)> g) {
    gradient_ = std::move(g);
  }
  // Changes the values of the updates MakeUpdate draws (after drawing them).
  void set_update_values(std::function<void(const std::string& id, Adapter&)> f) {
    update_values_ = std::move(f);
  }
  server::RoundEngine& engine() { return *engine_; }
  // Ticks the engine, then lets its follow-up (evaluation, metrics line, export) catch up.
  void Tick() {
    engine_->Tick();
    WaitForFollowUp();
  }
  server::ServerOptions& options() { return options_; }

  static int64_t Examples(const std::string& id) { return 10 * (1 + (id.back() - '0')); }

  absl::Status Join(const std::string& id, int64_t examples = -1) {
    return JoinFrom(id, "", examples).status();
  }
  // A join from address `peer`, with the response (its session).
  absl::StatusOr<v1::JoinResponse> JoinFrom(const std::string& id, std::string_view peer,
                                            int64_t examples = -1) {
    v1::JoinRequest r;
    r.set_base_model_sha256(kBaseSha);
    r.set_num_examples(examples > 0 ? examples : Examples(id));
    r.set_max_rank(64);
    for (const auto& [name, n, m] : modules_) {
      v1::ModuleSpec* s = r.add_modules();
      s->set_name(name);
      s->set_in_features(n);
      s->set_out_features(m);
    }
    return engine_->Join(id, r, peer);
  }

  absl::StatusOr<v1::Task> Task(const std::string& id, int64_t have = -1) {
    v1::GetTaskRequest r;
    r.set_have_version(have);
    return engine_->GetTaskBlocking(id, r);
  }

  absl::StatusOr<std::string> Fetch(const std::string& id, const v1::BlobRef& blob) {
    std::string bytes;
    while (static_cast<int64_t>(bytes.size()) < blob.size()) {
      v1::DownloadRequest r;
      r.set_sha256(blob.sha256());
      r.set_offset(static_cast<int64_t>(bytes.size()));
      auto chunk = engine_->Download(id, r);
      if (!chunk.ok()) return chunk.status();
      if (chunk->data().empty()) return absl::DataLossError("empty chunk");
      bytes += chunk->data();
    }
    return bytes;
  }

  // The update client `id` sends for `round`: factors drawn from (id, round), at the task's rank
  // (kRank when the task has none) and the client's scaling kAlpha / rank; for fed-sb an R on
  // the frozen B, A of `task`'s downloads.
  absl::StatusOr<Adapter> MakeUpdate(const std::string& id, const v1::Task& task) {
    const bool fed_sb = options_.method == common::Method::kFedSb;
    const int rank = task.settings().rank() > 0 ? task.settings().rank() : kRank;
    std::vector<common::ModuleShape> shapes;
    for (const auto& [name, n, m] : modules_)
      shapes.push_back({name, rank, n, m, kAlpha / rank, fed_sb});
    auto update = Adapter::Create(shapes);
    if (!update.ok()) return update.status();
    std::mt19937_64 rng(common::Fnv1a(id, static_cast<uint64_t>(task.round())));
    std::normal_distribution<float> normal(0.0f, 0.1f);
    if (fed_sb) {
      if (frozen_.num_modules() == 0) {
        for (const v1::BlobRef& b : task.downloads()) {
          if (b.kind() != v1::BLOB_KIND_FROZEN) continue;
          auto bytes = Fetch(id, b);
          if (!bytes.ok()) return bytes.status();
          auto frozen = common::DecodeAdapter(*bytes, "frozen");
          if (!frozen.ok()) return frozen.status();
          frozen_ = *std::move(frozen);
        }
      }
      if (frozen_.num_modules() != update->num_modules())
        return absl::FailedPreconditionError("no frozen B and A downloaded yet");
      for (size_t i = 0; i < update->num_modules(); ++i) {
        update->A(i) = frozen_.A(i);
        update->B(i) = frozen_.B(i);
        for (float& x : update->R(i).reshaped()) x = normal(rng);
      }
      return update;
    }
    for (float& x : update->values()) x = normal(rng);
    if (update_values_) update_values_(id, *update);
    return update;
  }

  std::string Encode(const Adapter& update) const {
    return common::EncodeAdapter(update, options_.method == common::Method::kFedSb
                                             ? common::AdapterParts::kROnly
                                             : common::AdapterParts::kAll);
  }

  // Sends `bytes` as `id`'s update for `task` in chunks; `upto` bytes only when set (a client that
  // disconnects mid-upload), claiming `examples` when set. The last response, or the first error.
  absl::StatusOr<v1::UploadResponse> Send(const std::string& id, const v1::Task& task,
                                          const std::string& bytes, int64_t upto = -1,
                                          int64_t examples = -1) {
    const int64_t end = upto < 0 ? static_cast<int64_t>(bytes.size()) : upto;
    absl::StatusOr<v1::UploadResponse> response = absl::InternalError("nothing sent");
    for (int64_t offset = 0; offset < end || offset == 0; offset += options_.chunk_bytes) {
      v1::UploadRequest r;
      r.set_round(task.round());
      r.set_state_version(task.state_version());
      r.set_sha256(common::Sha256Hex(bytes));
      r.set_total_size(static_cast<int64_t>(bytes.size()));
      r.set_offset(offset);
      r.set_data(bytes.substr(offset, std::min<int64_t>(options_.chunk_bytes, end - offset)));
      r.set_num_examples(examples > 0 ? examples : Examples(id));
      if (task.kind() == v1::Task::SKETCH) r.set_sketch_step(task.sketch().step());
      r.mutable_metrics()->set_loss_before(1.0);
      r.mutable_metrics()->set_loss_after(0.5);
      response = engine_->Upload(id, r);
      if (!response.ok()) return response;
    }
    WaitForFollowUp();  // what follows a close the upload made, as a test expects it
    return response;
  }

  // Client `id`'s answer to a SKETCH task, from set_gradient's G as the protocol says
  // (coordinator.proto, SketchTask): its product with Ω or with the downloaded basis.
  absl::StatusOr<std::string> SketchAnswer(const std::string& id, const v1::Task& task) {
    const v1::SketchTask& s = task.sketch();
    const auto step = common::ParseSketchStep(s.product());
    if (!step) return absl::InvalidArgumentError(s.product());
    std::vector<common::MatrixShape> modules;
    for (const auto& [name, n, m] : modules_) modules.push_back({name, m, n});
    const std::vector<common::MatrixShape> shapes =
        common::SketchBasisShapes(*step, modules, s.columns());
    std::vector<common::MatrixD> bases(shapes.size());
    if (*step == common::SketchStep::kRange) {
      for (size_t i = 0; i < shapes.size(); ++i)
        bases[i] = common::RangeBasis(s.seed(), i, static_cast<int>(shapes[i].rows),
                                      static_cast<int>(shapes[i].cols));
    } else if (*step != common::SketchStep::kDense) {
      auto bytes = Fetch(id, task.downloads(0));
      if (!bytes.ok()) return bytes.status();
      auto decoded = common::DecodeMatrices(*bytes, "basis", shapes);
      if (!decoded.ok()) return decoded.status();
      bases = *std::move(decoded);
    }
    std::vector<common::NamedMatrix> products;
    for (size_t i = 0; i < shapes.size(); ++i)
      products.push_back(
          {shapes[i].name, common::SketchProduct(*step, gradient_(id, i), bases[i])});
    return common::EncodeMatrices(products);
  }

  // One step of client `id`: asks for a task and, given TRAIN (or SKETCH), trains and uploads. The
  // task's kind, or the first error.
  absl::StatusOr<v1::Task::Kind> Step(const std::string& id) {
    auto task = Task(id);
    if (!task.ok()) return task.status();
    if (task->kind() == v1::Task::SKETCH) {
      auto answer = SketchAnswer(id, *task);
      if (!answer.ok()) return answer.status();
      auto sent = Send(id, *task, *answer);
      if (!sent.ok()) return sent.status();
      return v1::Task::SKETCH;
    }
    if (task->kind() != v1::Task::TRAIN) return task->kind();
    auto update = MakeUpdate(id, *task);
    if (!update.ok()) return update.status();
    auto sent = Send(id, *task, Encode(*update));
    if (!sent.ok()) return sent.status();
    return v1::Task::TRAIN;
  }

 private:
  server::ServerOptions options_;
  TestEnv* env_;
  std::unique_ptr<server::RoundEngine> engine_;
  bool wait_ = true;
  Adapter frozen_;
  Modules modules_ = kModules;
  std::function<common::MatrixD(const std::string&, size_t)> gradient_;
  std::function<void(const std::string&, Adapter&)> update_values_;
};

// The ledger and metrics of a state directory, as files (what an operator or a restart would see).
inline nlohmann::json ReadJson(const std::filesystem::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}
inline std::vector<nlohmann::json> ReadJsonLines(const std::filesystem::path& path) {
  std::vector<nlohmann::json> lines;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) lines.push_back(nlohmann::json::parse(line));
  return lines;
}
inline std::vector<int64_t> LedgerVersions(const std::filesystem::path& state_dir) {
  std::vector<int64_t> versions;
  if (!std::filesystem::exists(state_dir / "ledger.json")) return versions;
  const nlohmann::json ledger = ReadJson(state_dir / "ledger.json");
  for (const auto& v : ledger["versions"]) versions.push_back(v["version"].get<int64_t>());
  return versions;
}

}  // namespace fedlora::testing

#endif  // FEDLORA_TESTS_SERVER_ENGINE_HARNESS_H_
