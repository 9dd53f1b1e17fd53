#include "server/round_engine.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <future>
#include <random>

#include "common/aggregate.h"
#include "common/blob.h"
#include "common/file_util.h"
#include "common/low_rank.h"
#include "common/parallel.h"
#include "common/peft.h"
#include "common/status_macros.h"
#include "common/strings.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;
using common::StrCat;

uint64_t Fnv1a(std::string_view s, uint64_t h = 1469598103934665603ull) {
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

std::string JoinIds(const std::vector<std::string>& v) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : ",") + s;
  return out;
}

// incoming/ file name of a client's update for a round (the identity made safe for a file name).
std::string PartName(int64_t round, const std::string& client) {
  std::string name = StrCat("round", round, "-");
  for (char c : client) {
    name.push_back(std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.' ? c : '_');
  }
  return name + "-" + fmt::format("{:016x}", Fnv1a(client));
}

int64_t UnixMs() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// The run's module table as adapter shapes of rank r (scaling 1).
std::vector<common::ModuleShape> Shapes(const nlohmann::json& modules, int rank, bool has_r) {
  std::vector<common::ModuleShape> shapes;
  for (const auto& m : modules) {
    shapes.push_back({m["name"].get<std::string>(), rank, m["in_features"].get<int>(),
                      m["out_features"].get<int>(), 1.0, has_r});
  }
  return shapes;
}

// An m×k matrix with orthonormal columns drawn from `rng` (QR of a Gaussian matrix).
common::MatrixD RandomOrthonormal(int m, int k, std::mt19937_64& rng) {
  std::normal_distribution<double> normal;
  common::MatrixD g(m, k);
  for (double& x : g.reshaped()) x = normal(rng);
  return Eigen::HouseholderQR<common::MatrixD>(g).householderQ() * common::MatrixD::Identity(m, k);
}

}  // namespace

absl::StatusOr<std::unique_ptr<RoundEngine>> RoundEngine::Create(const ServerOptions& given) {
  RETURN_IF_ERROR(given.Validate());
  ServerOptions options = given;
  std::unique_ptr<common::Model> base;
  if (!options.base_model_dir.empty()) {
    ASSIGN_OR_RETURN(common::Model model, common::LoadModel(options.base_model_dir));
    base = std::make_unique<common::Model>(std::move(model));
    const std::string fingerprint = common::WeightsFingerprint(base->weights);
    if (!options.base_model_sha256.empty() && options.base_model_sha256 != fingerprint)
      return absl::InvalidArgumentError(
          StrCat("base_model_dir ", options.base_model_dir, " has fingerprint ", fingerprint,
                 " but base_model_sha256 is ", options.base_model_sha256));
    options.base_model_sha256 = fingerprint;  // clients must hold this model
    spdlog::info("base model {}: {} parameters, fingerprint {}", options.base_model_dir,
                 base->weights.num_parameters(), fingerprint);
  }
  ASSIGN_OR_RETURN(StateStore store, StateStore::Open(options.state_dir));
  std::unique_ptr<RoundEngine> engine(new RoundEngine(options, std::move(store)));
  if (base) {
    if (!options.eval_data.empty()) {
      ASSIGN_OR_RETURN(engine->eval_examples_, common::ReadExamples(options.eval_data, base->tokens,
                                                                    options.eval_max_length));
    }
    if (engine->method_ == Method::kFlora) engine->flora_merged_ = base->weights;
    engine->base_ = std::move(base);
  }
  if (options.client_dp()) {
    ASSIGN_OR_RETURN(engine->noise_, common::GaussianNoise::Secure());
    spdlog::info(
        "client-level DP: updates clipped to {} ({}), noise multiplier {}, delta {}{}; every "
        "client weighs the same and the divisor is the cohort drawn",
        options.dp_clip, options.dp_adaptive_clip ? "adaptive, initial" : "fixed",
        options.dp_noise_multiplier, options.dp_delta,
        options.dp_target_epsilon > 0 ? StrCat(", target epsilon ", options.dp_target_epsilon)
                                      : "");
    if (options.dp_noise_multiplier == 0)
      spdlog::warn("client-level DP without noise: updates are clipped, but epsilon is infinite");
  }
  if (engine->store_.has_ledger()) {
    const Ledger& l = engine->store_.ledger();
    const bool dp_run = l.client_dp.contains("rounds");
    if (l.versions.size() > 1 && dp_run != options.client_dp()) {
      return absl::FailedPreconditionError(StrCat(
          "state directory ", options.state_dir,
          dp_run ? " holds a run with" : " holds a run without",
          " client-level DP; continue it with the same dp settings or use another state_dir"));
    }
    if (l.method != options.method) {
      return absl::FailedPreconditionError(
          StrCat("state directory ", options.state_dir, " holds a ", l.method,
                 " run but method is ", options.method, "; use another state_dir for a new run"));
    }
    if (options.method == "fed-sb") {
      ASSIGN_OR_RETURN(std::string bytes,
                       engine->store_.ReadWholeBlob(l.versions.at(0).blobs.at(0).sha256));
      ASSIGN_OR_RETURN(engine->frozen_, common::DecodeAdapter(bytes, "frozen blob"));
    }
    if (engine->base_ && l.base_model_sha256 != options.base_model_sha256) {
      return absl::FailedPreconditionError(
          StrCat("state directory ", options.state_dir, " holds a run on base model ",
                 l.base_model_sha256, " but base_model_dir is ", options.base_model_sha256));
    }
    if (engine->flora_merged_) {  // what the clients hold: every completed round's delta merged
      for (size_t v = 1; v < l.versions.size(); ++v) {
        ASSIGN_OR_RETURN(std::string bytes,
                         engine->store_.ReadWholeBlob(l.versions[v].blobs.at(0).sha256));
        ASSIGN_OR_RETURN(Adapter delta, common::DecodeAdapter(bytes, "FLoRA delta"));
        RETURN_IF_ERROR(engine->flora_merged_->Merge(delta));
      }
    }
    engine->round_ = engine->current_version() + 1;
    if (engine->current_version() >= options.rounds) engine->phase_ = Phase::kDone;
    spdlog::info("continuing run {} from {}: version {} of {} rounds", l.run_id, options.state_dir,
                 engine->current_version(), options.rounds);
  } else {
    spdlog::info("new {} run in {}: waiting for {} clients", options.method, options.state_dir,
                 options.min_clients);
  }
  engine->ticker_ = std::thread([e = engine.get()] {
    std::unique_lock<std::mutex> lock(e->mu_);
    while (!e->stopping_) {
      e->ticker_cv_.wait_for(lock, std::chrono::milliseconds(50));
      lock.unlock();
      e->Tick();
      lock.lock();
    }
  });
  return engine;
}

RoundEngine::RoundEngine(const ServerOptions& options, StateStore store)
    : options_(options), method_(options.ParsedMethod()), store_(std::move(store)) {}

RoundEngine::~RoundEngine() {
  Shutdown();
  if (ticker_.joinable()) ticker_.join();
}

void RoundEngine::Shutdown() {
  std::vector<std::pair<TaskCallback, v1::Task>> ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
    CollectReadyWaitersLocked(&ready, /*all=*/true);
  }
  ticker_cv_.notify_all();
  Notify(ready);
}

int64_t RoundEngine::current_version() const {
  return store_.ledger().versions.empty() ? -1 : store_.ledger().versions.back().version;
}

bool RoundEngine::done() {
  std::lock_guard<std::mutex> lock(mu_);
  return phase_ == Phase::kDone;
}

absl::Status RoundEngine::InitializeRunLocked(const v1::JoinRequest& first) {
  Ledger ledger;
  std::mt19937_64 rng(options_.seed ^ 0x5eedf00dull);
  ledger.run_id = fmt::format("{}-{:016x}", options_.method,
                              Fnv1a(StrCat(options_.seed, first.base_model_sha256())));
  ledger.method = options_.method;
  ledger.base_model_sha256 = first.base_model_sha256();
  for (const v1::ModuleSpec& m : first.modules()) {
    bool wanted = options_.target_modules.empty();
    for (const std::string& t : options_.target_modules)
      wanted |= m.name().ends_with("." + t) || m.name() == t;
    if (wanted) {
      ledger.modules.push_back({{"name", m.name()},
                                {"in_features", m.in_features()},
                                {"out_features", m.out_features()}});
    }
  }
  if (ledger.modules.empty()) {
    return absl::InvalidArgumentError(StrCat("none of the client's ", first.modules_size(),
                                             " modules matches target_modules ",
                                             JoinIds(options_.target_modules)));
  }
  // Version 0, the state every client starts from.
  Version v0{0, {}};
  if (method_ == Method::kFedIt || method_ == Method::kLoraFair) {
    // A ~ U(−1/√n, 1/√n) as PEFT's kaiming_uniform(a=√5), B = 0: the initial global adapter,
    // scaling 1.
    ASSIGN_OR_RETURN(Adapter init, Adapter::Create(Shapes(ledger.modules, options_.rank, false)));
    for (size_t i = 0; i < init.num_modules(); ++i) {
      std::uniform_real_distribution<float> uni(
          -1.0f / std::sqrt(float(init.module(i).in_features)),
          1.0f / std::sqrt(float(init.module(i).in_features)));
      for (float& x : init.A(i).reshaped()) x = uni(rng);
    }
    const std::string bytes = common::EncodeAdapter(init);
    ASSIGN_OR_RETURN(std::string sha, store_.PutBlob(bytes));
    v0.blobs.push_back({sha, static_cast<int64_t>(bytes.size()), "adapter", 0});
  } else if (method_ == Method::kFedSb) {
    // Until LoRA-SB's gradient initialisation lands: B, A random orthonormal from the run's seed, R
    // = 0.
    ASSIGN_OR_RETURN(frozen_, Adapter::Create(Shapes(ledger.modules, options_.rank, true)));
    for (size_t i = 0; i < frozen_.num_modules(); ++i) {
      const auto& m = frozen_.module(i);
      frozen_.B(i) = RandomOrthonormal(m.out_features, m.rank, rng).cast<float>();
      frozen_.A(i) = RandomOrthonormal(m.in_features, m.rank, rng).transpose().cast<float>();
    }
    spdlog::info(
        "fed-sb: frozen B and A are random orthonormal matrices drawn from the run's seed (R "
        "starts at 0); "
        "LoRA-SB's gradient-based initialisation is not used in this run");
    const std::string bytes = common::EncodeAdapter(frozen_);
    ASSIGN_OR_RETURN(std::string sha, store_.PutBlob(bytes));
    v0.blobs.push_back({sha, static_cast<int64_t>(bytes.size()), "frozen", 0});
  }
  ledger.versions.push_back(std::move(v0));
  RETURN_IF_ERROR(store_.SaveLedger(ledger));
  round_ = 1;
  spdlog::info(
      "run {} created: base model {}, {} modules, rank {}, lora_alpha {}, {} local steps at "
      "learning rate {}",
      ledger.run_id, ledger.base_model_sha256, ledger.modules.size(), options_.rank,
      options_.lora_alpha, options_.local_steps, options_.learning_rate);
  return absl::OkStatus();
}

absl::StatusOr<v1::JoinResponse> RoundEngine::Join(const std::string& client,
                                                   const v1::JoinRequest& request) {
  std::vector<std::pair<TaskCallback, v1::Task>> ready;
  v1::JoinResponse response;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (!common::IsSha256Hex(request.base_model_sha256())) {
      return absl::InvalidArgumentError(StrCat("base_model_sha256 '", request.base_model_sha256(),
                                               "' is not a sha256 (64 lower-case hex digits)"));
    }
    if (request.num_examples() <= 0) {
      return absl::InvalidArgumentError(
          StrCat("num_examples is ", request.num_examples(), "; it must be positive"));
    }
    const std::string& expected =
        store_.has_ledger() ? store_.ledger().base_model_sha256 : options_.base_model_sha256;
    if (!expected.empty() && request.base_model_sha256() != expected) {
      spdlog::warn("refused {}: base model {} differs from the run's {}", client,
                   request.base_model_sha256(), expected);
      return absl::FailedPreconditionError(StrCat(
          "your base model's fingerprint ", request.base_model_sha256(), " differs from the run's ",
          expected, "; hint: wrong base model? every client must hold the same weights"));
    }
    if (request.max_rank() < options_.rank) {
      return absl::FailedPreconditionError(StrCat("the run trains rank ", options_.rank,
                                                  " but your max_rank is ", request.max_rank()));
    }
    if (!store_.has_ledger()) RETURN_IF_ERROR(InitializeRunLocked(request));
    for (const auto& m : store_.ledger().modules) {
      const auto it = std::find_if(request.modules().begin(), request.modules().end(),
                                   [&](const v1::ModuleSpec& s) { return s.name() == m["name"]; });
      if (it == request.modules().end() || it->in_features() != m["in_features"] ||
          it->out_features() != m["out_features"]) {
        return absl::FailedPreconditionError(
            StrCat("your model lacks module ", m["name"].get<std::string>(), " (",
                   m["out_features"].get<int>(), "x", m["in_features"].get<int>(),
                   ") of the run; hint: wrong base model?"));
      }
    }
    ClientInfo& info = clients_[client];
    const bool is_new = info.num_examples == 0;
    info.num_examples = request.num_examples();
    info.last_seen = Clock::now();
    info.left.clear();
    spdlog::info("{} {} ({} examples); {} clients joined", client, is_new ? "joined" : "re-joined",
                 request.num_examples(), clients_.size());
    if (phase_ == Phase::kWaitingForClients &&
        static_cast<int>(clients_.size()) >= options_.min_clients) {
      StartRoundLocked();
    }
    CollectReadyWaitersLocked(&ready, false);
    response.set_run_id(store_.ledger().run_id);
    response.set_method(options_.method);
    response.set_rounds(options_.rounds);
    response.set_max_chunk_bytes(options_.chunk_bytes);
  }
  Notify(ready);
  return response;
}

void RoundEngine::ClearUploadsLocked() {
  for (const auto& [id, u] : uploads_) {
    if (!u.accepted) store_.DropPart(PartName(round_, id));
  }
  uploads_.clear();
}

void RoundEngine::DropUploadLocked(const std::string& client) {
  if (uploads_.erase(client) > 0) store_.DropPart(PartName(round_, client));
}

size_t RoundEngine::ArrivedLocked() const {
  return static_cast<size_t>(std::count_if(
      uploads_.begin(), uploads_.end(), [](const auto& entry) { return entry.second.accepted; }));
}

bool RoundEngine::AnsweredLocked(const std::string& client) const {
  const auto up = uploads_.find(client);
  return (up != uploads_.end() && up->second.accepted) || declined_.contains(client);
}

bool RoundEngine::EveryMemberAnsweredLocked() const {
  return ArrivedLocked() + declined_.size() == cohort_.size();
}

void RoundEngine::StartRoundLocked() {
  std::vector<std::string> ids;  // the clients taking part
  for (const auto& [id, info] : clients_) {
    if (info.left.empty()) ids.push_back(id);
  }
  std::seed_seq seq{static_cast<uint32_t>(options_.seed),
                    static_cast<uint32_t>(options_.seed >> 32), static_cast<uint32_t>(round_),
                    static_cast<uint32_t>(attempt_)};
  std::mt19937_64 rng(seq);
  std::shuffle(ids.begin(), ids.end(), rng);
  const int n = static_cast<int>(ids.size());
  const int k = std::clamp(static_cast<int>(std::ceil(options_.fraction * n)),
                           std::min(options_.min_cohort, n), n);
  cohort_.assign(ids.begin(), ids.begin() + k);
  std::sort(cohort_.begin(), cohort_.end());
  ClearUploadsLocked();
  rejected_.clear();
  declined_.clear();
  sums_ = RunningSums{};
  for (auto& [id, info] : clients_) info.bytes_down_this_round = 0;
  absl::StatusOr<bool> started = true;
  if (ids.empty()) {
    spdlog::warn("round {}: every client has left the run", round_);
    started = false;
  } else if (options_.client_dp()) {
    started = StartClientDpRoundLocked(ids.size());
  }
  if (!started.ok() || !*started) {  // the run ends here
    if (!started.ok())
      spdlog::error("round {} cannot start: {}", round_, started.status().message());
    phase_ = Phase::kDone;
    cohort_.clear();
    if (current_version() >= 1) {
      if (absl::Status st = ExportLocked(); !st.ok())
        spdlog::error("export failed: {}", st.message());
    }
    spdlog::info("run {} ended at version {} of {} rounds", store_.ledger().run_id,
                 current_version(), options_.rounds);
    return;
  }
  round_started_ = Clock::now();
  if (!run_started_) run_started_ = round_started_;
  phase_ = Phase::kTraining;
  spdlog::info("round {}{}: cohort of {} of {} clients: {}", round_,
               attempt_ ? StrCat(" (attempt ", attempt_ + 1, ")") : "", k, n, JoinIds(cohort_));
}

std::vector<v1::BlobRef> RoundEngine::DownloadsLocked(int64_t have, int64_t target) const {
  std::vector<v1::BlobRef> out;
  auto add = [&](const BlobInfo& b) {
    v1::BlobRef ref;
    ref.set_sha256(b.sha256);
    ref.set_size(b.size);
    ref.set_kind(b.kind);
    ref.set_version(b.version);
    out.push_back(std::move(ref));
  };
  const auto& versions = store_.ledger().versions;
  if (have >= target) return out;
  switch (method_) {
    case Method::kFedIt:
    case Method::kLoraFair:
      for (const BlobInfo& b : versions.at(target).blobs)
        add(b);  // the latest global adapter is the whole state
      break;
    case Method::kFlora:
      for (int64_t v = std::max<int64_t>(have, 0) + 1; v <= target; ++v) {
        for (const BlobInfo& b : versions.at(v).blobs)
          add(b);  // every round delta not yet merged, in order
      }
      break;
    case Method::kFedSb:
      if (have < 0) add(versions.at(0).blobs.at(0));         // the frozen B, A once
      if (target > 0) add(versions.at(target).blobs.at(0));  // then only the latest R
      break;
  }
  return out;
}

v1::Task RoundEngine::TaskForLocked(const std::string& client, int64_t have_version) {
  v1::Task task;
  task.set_method(options_.method);
  task.set_round(round_);
  task.set_state_version(current_version());
  if (phase_ == Phase::kDone) {
    task.set_kind(v1::Task::DONE);
    task.set_round(current_version());
    for (auto& b : DownloadsLocked(have_version, current_version()))
      *task.add_downloads() = std::move(b);
    return task;
  }
  const bool in_cohort = std::binary_search(cohort_.begin(), cohort_.end(), client);
  const auto up = uploads_.find(client);
  if (phase_ != Phase::kTraining || !in_cohort || (up != uploads_.end() && up->second.accepted)) {
    task.set_kind(v1::Task::WAIT);
    task.set_note(phase_ == Phase::kWaitingForClients
                      ? StrCat("waiting for ", options_.min_clients, " clients to join, ",
                               clients_.size(), " joined")
                  : !in_cohort ? StrCat("not in round ", round_, "'s cohort")
                               : StrCat("update for round ", round_,
                                        " accepted; waiting for the round to close"));
    return task;
  }
  task.set_kind(v1::Task::TRAIN);
  for (auto& b : DownloadsLocked(have_version, current_version()))
    *task.add_downloads() = std::move(b);
  v1::TrainSettings* s = task.mutable_settings();
  s->set_rank(options_.rank);
  s->set_lora_alpha(options_.lora_alpha);
  s->set_local_steps(options_.local_steps);
  s->set_learning_rate(options_.learning_rate);
  s->set_seed(Fnv1a(client, options_.seed * 1000003ull + static_cast<uint64_t>(round_)));
  for (const auto& m : store_.ledger().modules) {
    v1::ModuleSpec* spec = task.add_modules();
    spec->set_name(m["name"].get<std::string>());
    spec->set_in_features(m["in_features"].get<int>());
    spec->set_out_features(m["out_features"].get<int>());
  }
  task.set_heartbeat_interval_ms(static_cast<int64_t>(options_.client_timeout_s * 1000 / 3));
  return task;
}

void RoundEngine::GetTask(const std::string& client, const v1::GetTaskRequest& request,
                          TaskCallback done) {
  absl::StatusOr<v1::Task> task;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = clients_.find(client);
    if (it == clients_.end()) {
      task = absl::FailedPreconditionError(StrCat(client, " has not joined; call Join first"));
    } else {
      it->second.last_seen = Clock::now();
      task = TaskForLocked(client, request.have_version());
      const int64_t wait_ms = std::clamp<int64_t>(request.max_wait_ms(), 0, options_.max_wait_ms);
      if (task->kind() == v1::Task::WAIT && wait_ms > 0 && !stopping_) {
        waiters_.push_back({client, request.have_version(),
                            Clock::now() + std::chrono::milliseconds(wait_ms), std::move(done)});
        return;
      }
    }
  }
  done(std::move(task));  // never under the lock
}

absl::StatusOr<v1::Task> RoundEngine::GetTaskBlocking(const std::string& client,
                                                      const v1::GetTaskRequest& request) {
  std::promise<absl::StatusOr<v1::Task>> promise;
  GetTask(client, request, [&](absl::StatusOr<v1::Task> t) { promise.set_value(std::move(t)); });
  return promise.get_future().get();
}

void RoundEngine::CollectReadyWaitersLocked(std::vector<std::pair<TaskCallback, v1::Task>>* ready,
                                            bool all) {
  const auto now = Clock::now();
  std::vector<Waiter> still;
  for (Waiter& w : waiters_) {
    v1::Task task = TaskForLocked(w.client, w.have_version);
    if (all || stopping_ || task.kind() != v1::Task::WAIT || now >= w.deadline) {
      ready->emplace_back(std::move(w.done), std::move(task));
    } else {
      still.push_back(std::move(w));
    }
  }
  waiters_ = std::move(still);
}

void RoundEngine::Notify(std::vector<std::pair<TaskCallback, v1::Task>>& ready) {
  for (auto& [done, task] : ready) done(std::move(task));
  ready.clear();
}

absl::StatusOr<v1::DownloadResponse> RoundEngine::Download(const std::string& client,
                                                           const v1::DownloadRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  bool known = false;
  for (const Version& v : store_.ledger().versions) {
    for (const BlobInfo& b : v.blobs) known |= b.sha256 == request.sha256();
  }
  if (!known)
    return absl::NotFoundError(StrCat("no blob ", request.sha256(), " in this run's ledger"));
  const int64_t max_bytes = request.max_bytes() > 0
                                ? std::min(request.max_bytes(), options_.chunk_bytes)
                                : options_.chunk_bytes;
  ASSIGN_OR_RETURN(auto chunk, store_.ReadBlob(request.sha256(), request.offset(), max_bytes));
  v1::DownloadResponse response;
  response.set_offset(request.offset());
  response.set_total_size(chunk.second);
  *response.mutable_data() = std::move(chunk.first);
  if (auto it = clients_.find(client); it != clients_.end()) {
    it->second.last_seen = Clock::now();
    it->second.bytes_down_this_round += static_cast<int64_t>(response.data().size());
  }
  return response;
}

absl::StatusOr<Adapter> RoundEngine::ValidateUpdate(const std::string& origin,
                                                    const nlohmann::json& modules,
                                                    std::string_view bytes) const {
  Adapter update;
  if (method_ == Method::kFedSb) {
    ASSIGN_OR_RETURN(update, common::DecodeROnto(bytes, origin, frozen_));
  } else {
    ASSIGN_OR_RETURN(update, common::DecodeAdapter(bytes, origin));
    for (const auto& m : modules) {
      const std::string name = m["name"].get<std::string>();
      const int n = m["in_features"].get<int>(), rows = m["out_features"].get<int>();
      auto i = update.FindModule(name);
      if (!i) return absl::InvalidArgumentError(StrCat(origin, ": module ", name, " is missing"));
      const auto& u = update.module(*i);
      if (u.rank != options_.rank || u.in_features != n) {
        return absl::InvalidArgumentError(StrCat("module ", name, ": lora_A has shape [", u.rank,
                                                 ",", u.in_features, "], task says [",
                                                 options_.rank, ",", n, "]"));
      }
      if (u.out_features != rows) {
        return absl::InvalidArgumentError(StrCat("module ", name, ": lora_B has shape [",
                                                 u.out_features, ",", u.rank, "], task says [",
                                                 rows, ",", options_.rank, "]"));
      }
      if (u.has_r)
        return absl::InvalidArgumentError(
            StrCat("module ", name, ": lora_R is not part of a ", options_.method, " update"));
    }
    if (update.num_modules() != modules.size()) {
      return absl::InvalidArgumentError(
          StrCat(origin, ": ", update.num_modules(), " modules, the task has ", modules.size()));
    }
  }
  RETURN_IF_ERROR(update.CheckFinite());
  return update;
}

absl::StatusOr<v1::UploadResponse> RoundEngine::Upload(const std::string& client,
                                                       const v1::UploadRequest& request) {
  v1::UploadResponse response;
  nlohmann::json modules;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (auto it = clients_.find(client); it != clients_.end()) it->second.last_seen = Clock::now();
    // Late: its round closed (at its deadline, or with quorum) before the update came.
    if (request.round() < round_ || (phase_ == Phase::kDone && request.round() == round_)) {
      if (late_.emplace(client, request.round()).second) {
        spdlog::warn("{}'s update for round {} came after that round closed; not counted (late)",
                     client, request.round());
      }
      return absl::FailedPreconditionError(
          StrCat("round ", request.round(), " closed before this update arrived (late)",
                 phase_ == Phase::kTraining ? StrCat("; round ", round_, " is open") : ""));
    }
    if (phase_ != Phase::kTraining) {
      return absl::FailedPreconditionError(
          StrCat("no round is open (upload for round ", request.round(), ")"));
    }
    if (request.round() != round_) {
      return absl::FailedPreconditionError(
          StrCat("upload for round ", request.round(), " but round ", round_, " is open"));
    }
    if (request.state_version() != current_version()) {
      return absl::FailedPreconditionError(StrCat("update trained from version ",
                                                  request.state_version(), " but round ", round_,
                                                  " trains from version ", current_version()));
    }
    if (!std::binary_search(cohort_.begin(), cohort_.end(), client)) {
      return absl::PermissionDeniedError(StrCat(client, " is not in round ", round_, "'s cohort"));
    }
    if (request.total_size() <= 0 || request.total_size() > options_.max_update_bytes) {
      spdlog::warn("round {}: refused {}'s update of {} bytes (limit {})", round_, client,
                   request.total_size(), options_.max_update_bytes);
      return absl::ResourceExhaustedError(StrCat("update of ", request.total_size(),
                                                 " bytes exceeds the limit of ",
                                                 options_.max_update_bytes, " bytes"));
    }
    if (!common::IsSha256Hex(request.sha256())) {
      return absl::InvalidArgumentError(
          StrCat("sha256 '", request.sha256(), "' is not 64 lower-case hex digits"));
    }
    PendingUpload& up = uploads_[client];
    if (up.verifying) {  // its part file must not change until FinishUpload is done with it
      return absl::UnavailableError(
          StrCat(client, "'s update for round ", round_, " is being verified; retry"));
    }
    if (up.accepted) {
      if (up.sha256 != request.sha256()) {
        return absl::AlreadyExistsError(StrCat("an update for round ", round_,
                                               " was already accepted from ", client, " (sha256 ",
                                               up.sha256, ")"));
      }
      response.set_received(up.total_size);  // an idempotent retry
      response.set_accepted(true);
      return response;
    }
    const std::string part = PartName(round_, client);
    if (up.sha256 != request.sha256() || up.total_size != request.total_size()) {
      up = PendingUpload{request.sha256(), request.total_size()};  // a new upload
      RETURN_IF_ERROR(store_.StartPart(part));
    }
    // Chunks may arrive in any order (clients keep several in flight); `received` is the contiguous
    // prefix.
    const int64_t begin = request.offset(),
                  end = begin + static_cast<int64_t>(request.data().size());
    if (begin < 0 || end > up.total_size) {
      DropUploadLocked(client);
      return absl::InvalidArgumentError(StrCat("chunk [", begin, ", ", end,
                                               ") is outside the announced size of ",
                                               request.total_size(), " bytes"));
    }
    if (end > begin) {
      RETURN_IF_ERROR(store_.WritePart(part, begin, request.data()));
      up.ranges.AddRange(begin, end);
      up.received = up.ranges.Prefix();
    }
    response.set_received(up.received);
    if (up.received < up.total_size) return response;  // more to come (or resume from here)

    up.verifying = true;
    modules = store_.ledger().modules;
  }
  return FinishUpload(client, request, modules);
}

absl::StatusOr<v1::UploadResponse> RoundEngine::FinishUpload(const std::string& client,
                                                             const v1::UploadRequest& request,
                                                             const nlohmann::json& modules) {
  // Verify and validate before it can reach the aggregate, without holding mu_: hashing and
  // checking a 100 MB update takes a few tenths of a second that other clients need not wait for.
  const auto verify_start = Clock::now();
  const std::string part = PartName(request.round(), client);
  absl::StatusOr<Adapter> adapter = [&]() -> absl::StatusOr<Adapter> {
    ASSIGN_OR_RETURN(common::MappedFile mapped, store_.MapPart(part));
    const std::string_view bytes(reinterpret_cast<const char*>(mapped.bytes().data()),
                                 mapped.bytes().size());
    // Hashing and syncing run beside the decoding and checks (another core).
    auto hashed = std::async(std::launch::async, [&]() -> absl::StatusOr<std::string> {
      std::string sha = common::Sha256Hex(bytes);
      RETURN_IF_ERROR(store_.SyncPart(part));
      return sha;
    });
    absl::StatusOr<Adapter> update = ValidateUpdate(
        StrCat("update of ", client, " for round ", request.round()), modules, bytes);
    ASSIGN_OR_RETURN(const std::string sha, hashed.get());
    if (sha != request.sha256()) {  // first: a damaged transfer explains any other finding
      return absl::InvalidArgumentError(StrCat("checksum mismatch: the update's sha256 is ", sha,
                                               " but the upload announced ", request.sha256()));
    }
    return update;
  }();

  std::vector<std::pair<TaskCallback, v1::Task>> ready;
  v1::UploadResponse response;
  absl::Status status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const auto it = uploads_.find(client);
    if (phase_ != Phase::kTraining || round_ != request.round() || it == uploads_.end() ||
        !it->second.verifying) {
      return absl::FailedPreconditionError(
          StrCat("round ", request.round(), " stopped waiting for ", client,
                 "'s update while it was verified (the run ended, or the client left)"));
    }
    PendingUpload& up = it->second;
    up.verifying = false;
    if (adapter.ok()) {
      if (absl::Status adopted = store_.AdoptPart(part, up.sha256); !adopted.ok())
        adapter = adopted;
    }
    if (!adapter.ok()) {
      status = adapter.status();
    } else {
      up.blob = up.sha256;
      up.accepted = true;
      up.num_examples =
          request.num_examples() > 0 ? request.num_examples() : clients_[client].num_examples;
      up.metrics = request.metrics();
      if (!streaming()) {
        up.adapter = *std::move(adapter);
      } else if (options_.client_dp()) {
        dp_round_->Add(*adapter).IgnoreError();  // validated against the run's modules above
      } else {
        FoldLocked(*adapter, static_cast<double>(up.num_examples));
      }
      response.set_received(up.total_size);
      response.set_accepted(true);
      spdlog::info("round {}: {}'s update of {} bytes verified, validated and folded in {:.3f} s",
                   round_, client, up.total_size,
                   std::chrono::duration<double>(Clock::now() - verify_start).count());
      spdlog::info(
          "round {}: accepted {}'s update ({} bytes, loss {:.6g} -> {:.6g}); {} of {} arrived",
          round_, client, up.total_size, up.metrics.loss_before(), up.metrics.loss_after(),
          ArrivedLocked(), cohort_.size());
      if (EveryMemberAnsweredLocked()) status = CloseRoundLocked(false);
      CollectReadyWaitersLocked(&ready, false);
    }
    if (!response.accepted()) {
      spdlog::warn("round {}: rejected {}'s update: {}", round_, client, status.message());
      rejected_.push_back(client);
      DropUploadLocked(client);
    }
  }
  Notify(ready);
  if (!status.ok() && !response.accepted()) return status;
  if (!status.ok()) spdlog::error("closing the round failed: {}", status.message());
  return response;
}

v1::HeartbeatResponse RoundEngine::Heartbeat(const std::string& client,
                                             const v1::HeartbeatRequest& request) {
  std::lock_guard<std::mutex> lock(mu_);
  v1::HeartbeatResponse response;
  if (auto it = clients_.find(client); it != clients_.end()) it->second.last_seen = Clock::now();
  response.set_still_wanted(phase_ == Phase::kTraining && request.round() == round_ &&
                            std::binary_search(cohort_.begin(), cohort_.end(), client));
  return response;
}

bool RoundEngine::streaming() const {
  return method_ == Method::kFedIt || method_ == Method::kFedSb;
}

void RoundEngine::FoldLocked(const Adapter& update, double weight) {
  const auto& modules = store_.ledger().modules;
  if (sums_.weight == 0) {
    sums_.a.assign(modules.size(), common::MatrixD());
    sums_.b.assign(modules.size(), common::MatrixD());
    sums_.r.assign(modules.size(), common::MatrixD());
  }
  auto add = [](common::MatrixD& sum, const auto& x) {  // x: an expression, never materialised
    if (sum.size() == 0) {
      sum = x;  // the first update: one pass, not zeros and then a sum
    } else {
      sum.noalias() += x;
    }
  };
  // Modules are independent: a large update folds them on every core (mu_ is held, so the fold is
  // kept short); a small one (Fed-SB's R) is not worth starting threads for.
  size_t folded = 0;  // values added
  for (const common::LoraModule& m : update.modules())
    folded += method_ == Method::kFedSb ? static_cast<size_t>(m.rank) * m.rank : m.size();
  const size_t threads = folded >= (size_t{1} << 20) ? 0 : 1;
  common::ParallelFor(
      modules.size(),
      [&](size_t i) {
        const size_t j =
            *update.FindModule(modules[i]["name"].get<std::string>());  // validated: present
        const double s = update.module(j).scaling;
        if (method_ == Method::kFedSb) {
          add(sums_.r[i], weight * s * update.R(j).cast<double>());
        } else {
          add(sums_.a[i], weight * update.A(j).cast<double>());
          add(sums_.b[i], weight * s * update.B(j).cast<double>());
        }
      },
      threads);
  sums_.weight += weight;
}

absl::StatusOr<Adapter> RoundEngine::SumsToAdapterLocked() const {
  Adapter out;
  if (method_ == Method::kFedSb) {
    out = frozen_;
  } else {
    ASSIGN_OR_RETURN(out, Adapter::Create(Shapes(store_.ledger().modules, options_.rank, false)));
  }
  for (size_t i = 0; i < out.num_modules(); ++i) {
    out.set_scaling(i, 1.0);
    if (method_ == Method::kFedSb) {
      out.R(i) = (sums_.r[i] / sums_.weight).cast<float>();
    } else {
      out.A(i) = (sums_.a[i] / sums_.weight).cast<float>();
      out.B(i) = (sums_.b[i] / sums_.weight).cast<float>();
    }
  }
  return out;
}

absl::Status RoundEngine::CloseRoundLocked(bool at_deadline) {
  std::vector<std::string> arrived;
  for (const auto& [id, u] : uploads_) {
    if (u.accepted) arrived.push_back(id);
  }
  // Members that declined their task are not waited for, and not counted in the quorum.
  const size_t quorum =
      static_cast<size_t>(std::ceil(options_.quorum * (cohort_.size() - declined_.size())));
  if (arrived.size() < std::max<size_t>(quorum, 1)) {
    if (!at_deadline) return absl::OkStatus();
    spdlog::warn(
        "round {}: {} of {} updates arrived, quorum is {}; retrying the round with a new cohort",
        round_, arrived.size(), cohort_.size(), quorum);
    ++attempt_;
    StartRoundLocked();
    return absl::OkStatus();
  }
  const auto start = Clock::now();
  std::vector<Adapter>
      updates;  // in client-id order (uploads_ is sorted), so the sums repeat exactly
  std::vector<double> weights;
  double loss_before = 0, loss_after = 0, examples = 0;
  nlohmann::json bytes_up = nlohmann::json::object(), bytes_down = nlohmann::json::object(),
                 update_blobs = nlohmann::json::object(),
                 update_examples = nlohmann::json::object(),
                 dp_epsilon = nlohmann::json::object();  // DP-SGD clients' spent budgets
  for (const std::string& id : arrived) {
    PendingUpload& u = uploads_[id];
    if (!streaming()) updates.push_back(std::move(u.adapter));
    weights.push_back(static_cast<double>(u.num_examples));
    loss_before += u.num_examples * u.metrics.loss_before();
    loss_after += u.num_examples * u.metrics.loss_after();
    examples += u.num_examples;
    bytes_up[id] = u.total_size;
    update_blobs[id] = u.blob;
    update_examples[id] = u.num_examples;
    if (u.metrics.dp_epsilon() > 0) dp_epsilon[id] = u.metrics.dp_epsilon();
    clients_[id].rounds_contributed++;
  }
  for (const std::string& id : cohort_) bytes_down[id] = clients_[id].bytes_down_this_round;
  // FedIT and Fed-SB were summed as updates arrived; FLoRA and LoRA-FAIR need every client's
  // factors.
  common::AggregateResult result;
  Ledger ledger = store_.ledger();
  nlohmann::json client_dp;  // this round's privacy figures
  if (options_.client_dp()) {
    ASSIGN_OR_RETURN(result, FinishClientDpRoundLocked(std::move(updates), &ledger, &client_dp));
  } else if (streaming()) {
    ASSIGN_OR_RETURN(result.adapter, SumsToAdapterLocked());
  } else {
    common::AggregateOptions agg{method_, {}};
    agg.lora_fair.lambda = options_.lora_fair_lambda;
    ASSIGN_OR_RETURN(result, common::Aggregate(updates, weights, agg));
  }
  const std::string bytes =
      common::EncodeAdapter(result.adapter, method_ == Method::kFedSb ? common::AdapterParts::kROnly
                                                                      : common::AdapterParts::kAll);
  ASSIGN_OR_RETURN(std::string sha, store_.PutBlob(bytes));
  const char* kind = method_ == Method::kFlora   ? "delta"
                     : method_ == Method::kFedSb ? "r"
                                                 : "adapter";
  ledger.versions.push_back({round_, {{sha, static_cast<int64_t>(bytes.size()), kind, round_}}});
  RETURN_IF_ERROR(store_.SaveLedger(ledger));
  const double seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (flora_merged_) RETURN_IF_ERROR(flora_merged_->Merge(result.adapter));
  std::optional<double> eval_loss;
  if (!eval_examples_.empty()) {
    // The global model: the base with the new adapter (LoRA-SB's frozen B, A carry the averaged R),
    // or for FLoRA the base with every round's delta merged.
    ASSIGN_OR_RETURN(common::LossSum l,
                     common::Evaluate(flora_merged_ ? *flora_merged_ : base_->weights,
                                      flora_merged_ ? nullptr : &result.adapter, eval_examples_,
                                      /*batch=*/8, /*threads=*/0));
    eval_loss = l.tokens > 0 ? l.sum / static_cast<double>(l.tokens) : 0.0;
  }

  std::vector<std::string> dropped;
  for (const std::string& id : cohort_) {
    if (!std::binary_search(arrived.begin(), arrived.end(), id) && !declined_.contains(id))
      dropped.push_back(id);
  }
  nlohmann::json line = {
      {"round", round_},
      {"attempt", attempt_ + 1},
      {"version", round_},
      {"method", options_.method},
      {"cohort", cohort_},
      {"arrived", arrived},
      {"dropped", dropped},
      {"rejected", rejected_},
      {"declined", declined_},
      {"late", late_},
      {"bytes_up", bytes_up},
      {"bytes_down", bytes_down},
      {"mean_loss_before", loss_before / examples},
      {"mean_train_loss", loss_after / examples},
      {"aggregation_seconds", seconds},
      {"elapsed_seconds", std::chrono::duration<double>(Clock::now() - *run_started_).count()},
      {"updates", update_blobs},
      {"examples", update_examples},
      {"global_blob", sha},
      {"blob_bytes", bytes.size()}};
  if (eval_loss) line["eval_loss"] = *eval_loss;
  if (!client_dp.empty()) {
    line["client_dp"] = client_dp;
    spdlog::info(
        "round {}: client-level DP spent epsilon {:.4f} at delta {} (order {}; q {:.4g}, noise "
        "multiplier {}, clip {:.6g}, next clip {:.6g})",
        round_, client_dp["epsilon"].get<double>(), options_.dp_delta, client_dp["order"].dump(),
        dp_sample_rate_, options_.dp_noise_multiplier, client_dp["clip"].get<double>(),
        client_dp["next_clip"].get<double>());
  }
  if (!dp_epsilon.empty()) {
    line["dp_epsilon"] = dp_epsilon;
    spdlog::info("round {}: DP-SGD epsilon spent by clients: {}", round_, dp_epsilon.dump());
  }
  if (method_ == Method::kLoraFair) {
    double objective = 0, fedit = 0;
    for (const auto& m : result.modules) {
      objective += m.lora_fair.objective / result.modules.size();
      fedit += m.lora_fair.fedit_objective / result.modules.size();
    }
    line["lora_fair_objective"] = objective;
    line["fedit_objective"] = fedit;
  }
  RETURN_IF_ERROR(store_.AppendMetrics(line));
  late_.clear();
  spdlog::info(
      "round {} closed: {} of {} updates{}; mean loss {:.6g} -> {:.6g}; aggregated in {:.3f} s; "
      "version {}",
      round_, arrived.size(), cohort_.size(),
      dropped.empty() ? "" : StrCat(" (dropped: ", JoinIds(dropped), ")"), loss_before / examples,
      loss_after / examples, seconds, round_);
  if (eval_loss)
    spdlog::info("round {}: held-out loss of the global model {:.6f} over {} records", round_,
                 *eval_loss, eval_examples_.size());
  ClearUploadsLocked();
  if (round_ >= options_.rounds) {
    phase_ = Phase::kDone;
    cohort_.clear();
    RETURN_IF_ERROR(ExportLocked());
    spdlog::info("run {} done after {} rounds", store_.ledger().run_id, options_.rounds);
    return absl::OkStatus();
  }
  ++round_;
  attempt_ = 0;
  StartRoundLocked();
  return absl::OkStatus();
}

nlohmann::json RoundEngine::ClientDpRoundEntry() const {
  // LoRA-FAIR's correction is a second Gaussian mechanism in the round.
  return {{"q", dp_sample_rate_},
          {"sigma", options_.dp_noise_multiplier},
          {"steps", method_ == Method::kLoraFair ? 2 : 1}};
}

absl::StatusOr<common::AdaptiveClipper> RoundEngine::AdaptiveClipperFor(double clip,
                                                                        double expected) const {
  ASSIGN_OR_RETURN(
      common::AdaptiveClipper clipper,
      common::AdaptiveClipper::Create({clip, options_.dp_target_quantile,
                                       options_.dp_clip_learning_rate, options_.dp_count_stddev},
                                      expected));
  RETURN_IF_ERROR(clipper.UpdateNoiseMultiplier(options_.dp_noise_multiplier).status());
  return clipper;
}

absl::StatusOr<bool> RoundEngine::StartClientDpRoundLocked(size_t population) {
  const Ledger& ledger = store_.ledger();
  const double expected = static_cast<double>(cohort_.size());
  dp_sample_rate_ = expected / static_cast<double>(population);
  if (options_.dp_target_epsilon > 0) {
    nlohmann::json rounds = ledger.client_dp.value("rounds", nlohmann::json::array());
    rounds.push_back(ClientDpRoundEntry());
    ASSIGN_OR_RETURN(common::PrivacySpent next, common::SpentOver(rounds, options_.dp_delta));
    if (next.epsilon > options_.dp_target_epsilon) {
      spdlog::warn(
          "client-level DP: round {} (q {:.4g}) would take epsilon to {:.4f} at delta {}, past the "
          "target {}; no more rounds are run",
          round_, dp_sample_rate_, next.epsilon, options_.dp_delta, options_.dp_target_epsilon);
      return false;
    }
  }
  const double clip = ledger.client_dp.value("clip", options_.dp_clip);
  // Refuse now, not at the close, a budget the count's noise would exceed.
  if (options_.dp_adaptive_clip) RETURN_IF_ERROR(AdaptiveClipperFor(clip, expected).status());
  ASSIGN_OR_RETURN(Adapter start, GlobalStateLocked());
  dp_round_.emplace(std::move(start), clip, expected);
  return true;
}

absl::StatusOr<common::AggregateResult> RoundEngine::FinishClientDpRoundLocked(
    std::vector<Adapter> updates, Ledger* ledger, nlohmann::json* metrics) {
  common::ClientDpRound& round = *dp_round_;
  for (const Adapter& u : updates) RETURN_IF_ERROR(round.Add(u).status());  // lora-fair
  const double expected = round.expected_clients(), clip = round.clip();
  const double z = options_.dp_noise_multiplier;
  double z_update = z;
  std::optional<common::AdaptiveClipper> clipper;
  if (options_.dp_adaptive_clip) {
    ASSIGN_OR_RETURN(clipper, AdaptiveClipperFor(clip, expected));
    ASSIGN_OR_RETURN(z_update, clipper->UpdateNoiseMultiplier(z));
  }
  common::AggregateResult result;
  result.adapter = round.Finish(z_update, *noise_);
  if (method_ == Method::kLoraFair) {
    ASSIGN_OR_RETURN(
        std::vector<common::LoraFairSolution> solutions,
        common::PrivateLoraFairCorrection(updates, round.start(), result.adapter, clip, z, expected,
                                          *noise_, {.lambda = options_.lora_fair_lambda}));
    for (size_t i = 0; i < solutions.size(); ++i) {
      result.modules.push_back({.name = result.adapter.module(i).name,
                                .rank = result.adapter.module(i).rank,
                                .lora_fair = std::move(solutions[i])});
    }
  }
  if (clipper) clipper->Update(round.norms(), *noise_);  // norms stay here: they are not private
  dp_round_.reset();
  const double next_clip = clipper ? clipper->clip() : clip;
  ledger->client_dp["clip"] = next_clip;
  ledger->client_dp["rounds"].push_back(ClientDpRoundEntry());
  ASSIGN_OR_RETURN(common::PrivacySpent spent,
                   common::SpentOver(ledger->client_dp["rounds"], options_.dp_delta));
  *metrics = {{"epsilon", spent.epsilon},
              {"delta", options_.dp_delta},
              {"order", spent.order},
              {"sample_rate", dp_sample_rate_},
              {"expected_clients", expected},
              {"noise_multiplier", z},
              {"update_noise_multiplier", z_update},
              {"clip", clip},
              {"next_clip", next_clip}};
  return result;
}

absl::StatusOr<Adapter> RoundEngine::GlobalStateLocked() const {
  const BlobInfo& latest = store_.ledger().versions.back().blobs.at(0);
  if (method_ == Method::kFedSb && latest.kind == "frozen") return frozen_;  // R = 0
  ASSIGN_OR_RETURN(std::string bytes, store_.ReadWholeBlob(latest.sha256));
  const std::string origin = StrCat("blob ", latest.sha256);
  if (method_ == Method::kFedSb) return common::DecodeROnto(bytes, origin, frozen_);
  return common::DecodeAdapter(bytes, origin);
}

absl::Status RoundEngine::ExportNow() {
  std::lock_guard<std::mutex> lock(mu_);
  if (current_version() < 1) {
    return absl::FailedPreconditionError(
        "no round has completed yet, so there is no global state to export");
  }
  return ExportLocked();
}

absl::Status RoundEngine::ExportLocked() {
  const std::filesystem::path dir = std::filesystem::path(options_.state_dir) / "export";
  const auto& versions = store_.ledger().versions;
  auto blob = [&](const BlobInfo& b) -> absl::StatusOr<Adapter> {
    ASSIGN_OR_RETURN(std::string bytes, store_.ReadWholeBlob(b.sha256));
    return common::DecodeAdapter(bytes, StrCat("blob ", b.sha256));
  };
  common::PeftWriteOptions write{common::DType::kF32, /*overwrite=*/true};
  Adapter global;
  switch (method_) {
    case Method::kFedIt:
    case Method::kLoraFair: {
      ASSIGN_OR_RETURN(global, GlobalStateLocked());
      break;
    }
    case Method::kFedSb: {
      ASSIGN_OR_RETURN(global, GlobalStateLocked());
      RETURN_IF_ERROR(common::WritePeftAdapter(global.FoldR(), dir / "global-lora", write));
      break;
    }
    case Method::kFlora: {
      // The exact sum of every round's stacked delta: one adapter of rank Σ_t R_t.
      std::vector<Adapter> deltas;
      for (size_t v = 1; v < versions.size(); ++v) {
        ASSIGN_OR_RETURN(Adapter d, blob(versions[v].blobs.at(0)));
        deltas.push_back(std::move(d));
      }
      std::vector<common::ModuleShape> shapes;
      for (size_t i = 0; i < deltas[0].num_modules(); ++i) {
        common::ModuleShape s = deltas[0].module(i);
        s.rank = 0;
        for (const Adapter& d : deltas) s.rank += d.module(i).rank;
        shapes.push_back(s);
      }
      ASSIGN_OR_RETURN(global, Adapter::Create(shapes));
      for (size_t i = 0; i < shapes.size(); ++i) {
        int row = 0;
        for (const Adapter& d : deltas) {
          const int r = d.module(i).rank;
          global.A(i).middleRows(row, r) = d.A(i);
          global.B(i).middleCols(row, r) = d.B(i);
          row += r;
        }
      }
      break;
    }
  }
  global.base_model = store_.ledger().base_model_sha256;
  RETURN_IF_ERROR(common::WritePeftAdapter(global, dir / "global", write));
  if (base_) {  // the base model with the run's result folded in
    common::LlamaWeights merged = flora_merged_ ? *flora_merged_ : base_->weights;
    if (!flora_merged_) RETURN_IF_ERROR(merged.Merge(global));
    RETURN_IF_ERROR(merged.WriteModelDirectory(dir / "merged", options_.base_model_dir,
                                               common::DType::kF32, /*overwrite=*/true));
  }
  if (method_ == Method::kFlora) {
    // Also at the run's rank: the truncated SVD of each module's summed delta, and the energy it
    // keeps.
    std::vector<common::ModuleShape> shapes;
    std::vector<common::TruncatedProduct> cuts;
    nlohmann::json energy = nlohmann::json::object();
    double min_energy = 1;
    for (size_t i = 0; i < global.num_modules(); ++i) {
      cuts.push_back(common::TruncateProduct(global.B(i).cast<double>(), global.A(i).cast<double>(),
                                             options_.rank));
      common::ModuleShape s = global.module(i);
      s.rank = static_cast<int>(cuts.back().a.rows());
      shapes.push_back(s);
      energy[s.name] = cuts.back().retained_energy;
      min_energy = std::min(min_energy, cuts.back().retained_energy);
    }
    ASSIGN_OR_RETURN(Adapter truncated, Adapter::Create(shapes));
    truncated.base_model = global.base_model;
    for (size_t i = 0; i < shapes.size(); ++i) {
      truncated.A(i) = cuts[i].a.cast<float>();
      truncated.B(i) = cuts[i].b.cast<float>();
    }
    const std::string name = StrCat("global-rank", options_.rank);
    RETURN_IF_ERROR(common::WritePeftAdapter(truncated, dir / name, write));
    RETURN_IF_ERROR(common::WriteFileAtomically(
        dir / "retained_energy.json",
        nlohmann::json({{"rank", options_.rank}, {"min", min_energy}, {"modules", energy}})
                .dump(2) +
            "\n"));
    spdlog::info(
        "exported the rank-{} truncation of the summed deltas to {} (retained energy: min {:.6f} "
        "over "
        "modules)",
        options_.rank, (dir / name).string(), min_energy);
  }
  // Which state the export holds (an export on demand is of a run still in progress).
  RETURN_IF_ERROR(common::WriteFileAtomically(dir / "version.json",
                                              nlohmann::json({{"run_id", store_.ledger().run_id},
                                                              {"method", options_.method},
                                                              {"version", current_version()},
                                                              {"rounds", options_.rounds}})
                                                      .dump(2) +
                                                  "\n"));
  spdlog::info("exported version {} of {} rounds: the global adapter is in {}", current_version(),
               options_.rounds, (dir / "global").string());
  return absl::OkStatus();
}

void RoundEngine::Tick() {
  std::vector<std::pair<TaskCallback, v1::Task>> ready;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (phase_ == Phase::kTraining) {
      const auto now = Clock::now();
      const bool deadline =
          now - round_started_ >= std::chrono::duration<double>(options_.round_deadline_s);
      // Every member that has not delivered is silent past the timeout: waiting longer cannot help.
      bool all_silent = true;
      for (const std::string& id : cohort_) {
        if (AnsweredLocked(id)) continue;
        all_silent &= now - clients_[id].last_seen >=
                      std::chrono::duration<double>(options_.client_timeout_s);
      }
      // An update whose last chunk has arrived is not cut off while it is checked (a fraction of a
      // second per 100 MB): the round closes at the next tick after.
      const bool verifying = std::any_of(uploads_.begin(), uploads_.end(),
                                         [](const auto& entry) { return entry.second.verifying; });
      if ((deadline || all_silent) && !verifying) {
        if (absl::Status st = CloseRoundLocked(/*at_deadline=*/true); !st.ok()) {
          spdlog::error("closing round {} failed: {}", round_, st.message());
        }
      }
    }
    CollectReadyWaitersLocked(&ready, false);
  }
  Notify(ready);
}

absl::StatusOr<v1::LeaveResponse> RoundEngine::Leave(const std::string& client,
                                                     const v1::LeaveRequest& request) {
  std::vector<std::pair<TaskCallback, v1::Task>> ready;
  absl::Status status;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = clients_.find(client);
    if (it == clients_.end())
      return absl::FailedPreconditionError(
          StrCat(client, " has not joined; there is nothing to leave"));
    it->second.left = request.reason().empty() ? "no reason given" : request.reason();
    spdlog::warn("{} left the run: {}", client, it->second.left);
    if (phase_ == Phase::kTraining && request.round() == round_ &&
        std::binary_search(cohort_.begin(), cohort_.end(), client) && !AnsweredLocked(client)) {
      declined_[client] = it->second.left;
      DropUploadLocked(client);
      // Nobody left to wait for: close the round now (or retry it without quorum).
      if (EveryMemberAnsweredLocked()) status = CloseRoundLocked(/*at_deadline=*/true);
    }
    CollectReadyWaitersLocked(&ready, false);
  }
  Notify(ready);
  if (!status.ok()) spdlog::error("closing the round failed: {}", status.message());
  return v1::LeaveResponse();
}

v1::StatusResponse RoundEngine::GetStatus() {
  std::lock_guard<std::mutex> lock(mu_);
  v1::StatusResponse s;
  s.set_run_id(store_.has_ledger() ? store_.ledger().run_id : "");
  s.set_method(options_.method);
  s.set_round(phase_ == Phase::kDone ? current_version() : round_);
  s.set_rounds(options_.rounds);
  s.set_state_version(current_version());
  s.set_phase(phase_ == Phase::kDone       ? "done"
              : phase_ == Phase::kTraining ? "training"
                                           : "waiting for clients");
  for (const auto& id : cohort_) s.add_cohort(id);
  for (const auto& [id, u] : uploads_) {
    if (u.accepted) s.add_arrived(id);
  }
  const auto now = Clock::now();
  for (const auto& [id, info] : clients_) {
    v1::ClientStatus* c = s.add_clients();
    c->set_id(id);
    c->set_num_examples(info.num_examples);
    c->set_last_seen_unix_ms(
        UnixMs() -
        std::chrono::duration_cast<std::chrono::milliseconds>(now - info.last_seen).count());
    c->set_rounds_contributed(info.rounds_contributed);
  }
  return s;
}

}  // namespace fedlora::server
