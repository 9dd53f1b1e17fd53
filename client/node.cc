#include "client/node.h"

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <chrono>
#include <random>
#include <thread>

#include "client/upload.h"
#include "common/aggregation/lora_fair.h"
#include "common/aggregation/sketch.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/net/revocation.h"
#include "common/net/tls.h"
#include "common/net/wire.h"
#include "common/privacy/client_dp.h"
#include "common/secagg/protocol.h"
#include "common/secagg/quantise.h"
#include "common/tensor/blob.h"
#include "common/tensor/peft.h"
#include "common/tensor/safetensors.h"

namespace fedlora::client {
namespace {

using common::Adapter;
using common::StrCat;

absl::Status FromGrpc(const grpc::Status& s, std::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      StrCat(what, ": ", s.error_message()));
}

// What kind of refusal `s` is (REASON_UNSPECIFIED when the coordinator did not say).
v1::ErrorDetail::Reason ReasonOf(const grpc::Status& s) {
  v1::ErrorDetail detail;
  if (s.error_details().empty() || !detail.ParseFromString(s.error_details()))
    return v1::ErrorDetail::REASON_UNSPECIFIED;
  return detail.reason();
}

bool Transient(const grpc::Status& s) {
  return s.error_code() == grpc::StatusCode::UNAVAILABLE ||
         s.error_code() == grpc::StatusCode::DEADLINE_EXCEEDED;
}

}  // namespace

Node::Node(std::shared_ptr<grpc::Channel> channel, const NodeOptions& options,
           std::unique_ptr<Workload> workload)
    : stub_(v1::Coordinator::NewStub(channel)), options_(options), workload_(std::move(workload)) {}

void Node::Identify(grpc::ClientContext& context) const {
  if (!options_.id.empty()) context.AddMetadata(common::kClientIdMetadata, options_.id);
  if (!session_.empty()) context.AddMetadata(common::kSessionMetadata, session_);
}

grpc::Status Node::Retry(const std::function<grpc::Status(grpc::ClientContext&)>& call,
                         const std::atomic<bool>& stop) {
  const auto start = std::chrono::steady_clock::now();
  std::mt19937 jitter(std::random_device{}());
  double backoff_s = 0.1;
  for (;;) {
    grpc::ClientContext context;
    Identify(context);
    grpc::Status s = call(context);
    if (s.ok() || !Transient(s) || stop) return s;
    if (options_.diagnose_refusal) {
      if (absl::Status refused = options_.diagnose_refusal(s); absl::IsPermissionDenied(refused))
        return grpc::Status(grpc::StatusCode::PERMISSION_DENIED, std::string(refused.message()));
    }
    if (std::chrono::steady_clock::now() - start >
        std::chrono::duration<double>(options_.max_retry_s))
      return s;
    spdlog::warn("{} ({}); retrying in {:.1f} s", s.error_message(),
                 static_cast<int>(s.error_code()), backoff_s);
    std::this_thread::sleep_for(std::chrono::duration<double>(
        backoff_s * (0.5 + std::uniform_real_distribution<>(0, 1)(jitter))));
    backoff_s = std::min(backoff_s * 2, 5.0);
  }
}

absl::Status Node::JoinCoordinator(const std::atomic<bool>& stop) {
  v1::JoinRequest request;
  request.set_base_model_sha256(workload_->fingerprint());
  request.set_max_rank(1 << 16);
  request.set_num_examples(workload_->num_examples());
  for (auto& m : workload_->modules()) *request.add_modules() = std::move(m);
  v1::JoinResponse response;
  grpc::Status s =
      Retry([&](grpc::ClientContext& c) { return stub_->Join(&c, request, &response); }, stop);
  RETURN_IF_ERROR(FromGrpc(s, "join"));
  absl::StatusOr<common::Method> method = common::FromWire(response.method());
  if (!method.ok()) return absl::FailedPreconditionError(method.status().message());
  method_ = *method;
  session_ = response.session();
  if (response.max_chunk_bytes() > 0 && response.max_chunk_bytes() < options_.chunk_bytes) {
    spdlog::info("using the coordinator's chunk size of {} bytes", response.max_chunk_bytes());
    options_.chunk_bytes = response.max_chunk_bytes();
  }
  spdlog::info("joined run {} ({}, {} rounds)", response.run_id(), common::MethodName(method_),
               response.rounds());
  return absl::OkStatus();
}

absl::StatusOr<std::string> Node::DownloadBlob(const v1::BlobRef& ref,
                                               const std::atomic<bool>& stop) {
  std::string data;
  while (static_cast<int64_t>(data.size()) < ref.size()) {
    v1::DownloadRequest request;
    request.set_sha256(ref.sha256());
    request.set_offset(
        static_cast<int64_t>(data.size()));  // a retried chunk resumes from what we hold
    request.set_max_bytes(options_.chunk_bytes);
    v1::DownloadResponse response;
    int attempts = 0;
    grpc::Status s = Retry(
        [&](grpc::ClientContext& c) {
          if (attempts++ > 0) {
            spdlog::info("resuming download of {} at offset {} of {}", ref.sha256(),
                         request.offset(), ref.size());
          }
          return stub_->Download(&c, request, &response);
        },
        stop);
    RETURN_IF_ERROR(FromGrpc(s, StrCat("download of ", ref.sha256())));
    if (response.data().empty())
      return absl::DataLossError(StrCat("blob ", ref.sha256(), " ended early"));
    data += response.data();
  }
  if (common::Sha256Hex(data) != ref.sha256()) {
    return absl::DataLossError(
        StrCat("blob ", ref.sha256(), " failed verification (sha256 mismatch)"));
  }
  return data;
}

absl::Status Node::Apply(const v1::Task& task, const std::atomic<bool>& stop) {
  // Downloads arrive in apply order; all of them take us to task.state_version().
  for (const v1::BlobRef& ref : task.downloads()) {
    ASSIGN_OR_RETURN(const common::BlobKind kind, common::FromWire(ref.kind()));
    ASSIGN_OR_RETURN(std::string bytes, DownloadBlob(ref, stop));
    const std::string origin =
        StrCat(common::BlobKindName(kind), " blob of version ", ref.version());
    switch (kind) {
      case common::BlobKind::kDelta: {  // FLoRA: every round's delta, in order
        ASSIGN_OR_RETURN(Adapter delta, common::DecodeAdapter(bytes, origin));
        RETURN_IF_ERROR(workload_->MergeIntoBase(delta));
        break;
      }
      case common::BlobKind::kR: {
        ASSIGN_OR_RETURN(global_, common::DecodeROnto(bytes, origin, global_));
        break;
      }
      case common::BlobKind::kAdapter:
      case common::BlobKind::kFrozen: {
        ASSIGN_OR_RETURN(global_, common::DecodeAdapter(bytes, origin));
        break;
      }
      case common::BlobKind::kBasis:
        return absl::FailedPreconditionError(
            StrCat("a task to train asked to apply ", origin, ", which only a sketch step uses"));
    }
    spdlog::info("applied {} ({} bytes)", origin, bytes.size());
  }
  have_version_ = task.state_version();
  return absl::OkStatus();
}

absl::Status Node::Train(const v1::Task& task, const std::atomic<bool>& stop) {
  const auto start = std::chrono::steady_clock::now();
  const v1::TrainSettings& s = task.settings();
  const double scaling = s.lora_alpha() / s.rank();
  std::vector<common::ModuleShape> shapes;
  for (const v1::ModuleSpec& m : task.modules()) {
    shapes.push_back({m.name(), s.rank(), m.in_features(), m.out_features(), scaling,
                      method_ == common::Method::kFedSb});
  }
  ASSIGN_OR_RETURN(Adapter adapter, Adapter::Create(shapes));
  std::mt19937_64 rng(s.seed());
  for (size_t i = 0; i < adapter.num_modules(); ++i) {
    const auto g =
        global_.num_modules() ? global_.FindModule(adapter.module(i).name) : std::nullopt;
    if (method_ == common::Method::kFlora || !g) {
      common::InitLoraA(adapter.A(i), rng);  // a fresh module, as PEFT starts one
    } else {
      // From the global state (scaling 1): our scaling s is unfolded from B (or R).
      const double s_global = global_.module(*g).scaling;
      adapter.A(i) = global_.A(*g);
      adapter.B(i) = global_.B(*g);
      if (method_ == common::Method::kFedSb) {
        adapter.R(i) = global_.R(*g) * static_cast<float>(s_global / scaling);
      } else {
        adapter.B(i) *= static_cast<float>(s_global / scaling);
      }
    }
  }
  absl::StatusOr<v1::TrainMetrics> trained;
  const bool wanted = WhileHeartbeating(task, [&] { trained = workload_->Train(task, adapter); });
  RETURN_IF_ERROR(trained.status());
  if (!wanted) {
    return absl::AbortedError(StrCat("round ", task.round(),
                                     " no longer waits for this update (it closed, or moved on "
                                     "without this client); not uploading it"));
  }
  v1::TrainMetrics metrics = *trained;
  metrics.set_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  spdlog::info("round {}: trained {} steps, loss {:.6g} -> {:.6g}", task.round(), s.local_steps(),
               metrics.loss_before(), metrics.loss_after());
  int64_t num_examples = workload_->num_examples();
  if (options_.before_upload) options_.before_upload(adapter, num_examples);
  if (task.has_secagg_config()) {  // the change from the round's start (the global state)
    std::vector<float> change(common::TrainableCount(global_));
    RETURN_IF_ERROR(common::ChangeInto(adapter, global_, change));
    const v1::SecAggConfig& c = task.secagg_config();
    RETURN_IF_ERROR(AdvertiseKeys(task, c, "the change",
                                  std::vector<double>(change.begin(), change.end()), num_examples,
                                  metrics, stop));
    if (method_ == common::Method::kLoraFair)
      trained_ = Trained{c.instance(), std::move(adapter), global_, task, metrics, num_examples};
    return absl::OkStatus();
  }
  const std::string bytes = common::EncodeAdapter(adapter, method_ == common::Method::kFedSb
                                                               ? common::AdapterParts::kROnly
                                                               : common::AdapterParts::kAll);
  return UploadUpdate(task, bytes, metrics, num_examples, stop);
}

bool Node::WhileHeartbeating(const v1::Task& task, const std::function<void()>& work) {
  // Heartbeats, so the coordinator does not count us as dropped; its answer says whether the round
  // still waits for this update.
  std::atomic<bool> working{true}, wanted{true};
  std::thread heartbeat([&] {
    const auto interval =
        std::chrono::milliseconds(std::max<int64_t>(task.heartbeat_interval_ms(), 100));
    auto next = std::chrono::steady_clock::now() + interval;
    while (working) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      if (std::chrono::steady_clock::now() < next) continue;
      next += interval;
      v1::HeartbeatRequest request;
      request.set_round(task.round());
      v1::HeartbeatResponse response;
      grpc::ClientContext context;
      Identify(context);
      context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
      const grpc::Status s = stub_->Heartbeat(&context, request, &response);
      if ((s.ok() && !response.still_wanted()) || ReasonOf(s) == v1::ErrorDetail::SUPERSEDED)
        wanted = false;
    }
  });
  work();
  working = false;
  heartbeat.join();
  return wanted;
}

absl::Status Node::Sketch(const v1::Task& task, const std::atomic<bool>& stop) {
  const v1::SketchTask& s = task.sketch();
  const std::string name = StrCat("fed-sb initialisation step ", s.step() + 1, " of ", s.steps(),
                                  " (", s.product(), ")");
  const std::optional<common::SketchStep> step = common::ParseSketchStep(s.product());
  if (!step) return absl::InvalidArgumentError(StrCat(name, ": unknown product"));
  std::vector<common::MatrixShape> modules;
  for (const v1::ModuleSpec& m : task.modules())
    modules.push_back({m.name(), m.out_features(), m.in_features()});
  const std::vector<common::MatrixShape> shapes =
      common::SketchBasisShapes(*step, modules, s.columns());
  std::vector<common::MatrixD> bases(shapes.size());
  if (*step == common::SketchStep::kRange) {  // Ω, drawn alike everywhere
    for (size_t i = 0; i < shapes.size(); ++i) {
      bases[i] = common::RangeBasis(s.seed(), i, static_cast<int>(shapes[i].rows),
                                    static_cast<int>(shapes[i].cols));
    }
  } else if (*step != common::SketchStep::kDense) {
    if (task.downloads_size() != 1)
      return absl::InvalidArgumentError(StrCat(name, " comes without the previous step's basis"));
    ASSIGN_OR_RETURN(std::string bytes, DownloadBlob(task.downloads(0), stop));
    ASSIGN_OR_RETURN(bases, common::DecodeMatrices(bytes, StrCat(name, "'s basis"), shapes));
  }
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<common::MatrixD>> products;
  const bool wanted =
      WhileHeartbeating(task, [&] { products = workload_->Sketch(task, *step, bases); });
  RETURN_IF_ERROR(products.status());
  if (!wanted) {
    return absl::AbortedError(
        StrCat(name, " no longer waits for this client's answer; not uploading it"));
  }
  if (task.has_secagg_config()) {
    std::vector<double> flat;
    for (const common::MatrixD& p : *products)
      flat.insert(flat.end(), p.data(), p.data() + p.size());
    const int64_t examples = workload_->num_examples();
    v1::TrainMetrics none;
    return AdvertiseKeys(task, task.secagg_config(), "the answer", std::move(flat), examples, none,
                         stop);
  }
  std::vector<common::NamedMatrix> named;
  for (int i = 0; i < task.modules_size(); ++i)
    named.push_back({task.modules(i).name(), std::move((*products)[static_cast<size_t>(i)])});
  const std::string bytes = common::EncodeMatrices(named);
  v1::TrainMetrics metrics;
  metrics.set_seconds(
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  spdlog::info("{}: computed in {:.2f} s, uploading {} bytes", name, metrics.seconds(),
               bytes.size());
  return UploadUpdate(task, bytes, metrics, workload_->num_examples(), stop);
}

void Node::Leave(const v1::Task& task, const std::string& reason) {
  v1::LeaveRequest leave;
  leave.set_round(task.round());
  leave.set_reason(reason);
  v1::LeaveResponse left;
  grpc::ClientContext context;
  Identify(context);
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  if (grpc::Status s = stub_->Leave(&context, leave, &left); !s.ok()) {
    spdlog::warn("could not tell the coordinator ({}); it will count this client as dropped",
                 s.error_message());
  }
}

absl::Status Node::UploadUpdate(const v1::Task& task, const std::string& bytes,
                                const v1::TrainMetrics& metrics, int64_t num_examples,
                                const std::atomic<bool>& stop) {
  v1::UploadRequest header;
  header.set_round(task.round());
  header.set_state_version(task.state_version());
  header.set_sha256(common::Sha256Hex(bytes));
  header.set_total_size(static_cast<int64_t>(bytes.size()));
  header.set_num_examples(num_examples);
  *header.mutable_metrics() = metrics;
  if (task.kind() == v1::Task::SKETCH) header.set_sketch_step(task.sketch().step());
  UploadSettings settings;
  settings.chunk_bytes = options_.chunk_bytes;
  if (options_.before_upload_chunk) {
    settings.window = 1;  // chunks in order, so the hook sees a known prefix sent
    settings.before_chunk = [&](int64_t offset) {
      options_.before_upload_chunk(offset, static_cast<int64_t>(bytes.size()));
    };
  }
  grpc::Status s = UploadInChunks(
      header, bytes, settings, [&](const v1::UploadRequest& r, v1::UploadResponse* out) {
        return Retry([&](grpc::ClientContext& c) { return stub_->Upload(&c, r, out); }, stop);
      });
  if (const auto reason = ReasonOf(s);
      reason == v1::ErrorDetail::LATE || reason == v1::ErrorDetail::STALE_TASK) {
    // The coordinator moved on (the round closed, or a new state version) while this client
    // trained: the task is stale, not failed.
    return absl::AbortedError(StrCat("round ", task.round(), ": ", s.error_message()));
  }
  RETURN_IF_ERROR(FromGrpc(s, StrCat("upload for round ", task.round())));
  spdlog::info("round {}: update accepted ({} bytes)", task.round(), bytes.size());
  return absl::OkStatus();
}

struct Node::SecureTask {
  secagg::ClientSession session;
  std::vector<uint64_t> words;  // the quantised change, to be masked
  v1::Task task;                // the training task it answers
  v1::TrainMetrics metrics;
  int64_t num_examples = 0;
};

std::vector<double> Node::SecureInput(const v1::SecAggConfig& c, int64_t round,
                                      std::string_view what, std::vector<double> x,
                                      int64_t num_examples) const {
  double norm = 0;
  for (double v : x) norm += v * v;
  norm = std::sqrt(norm);
  // Scaled to norm 1 (a sketch step under DP), or clipped; then weighted as the task says, by
  // w = min(examples, cap)/cap for the examples the upload will claim.
  const double clip = c.unit_norm()            ? (norm > 0 ? 1 / norm : 1.0)
                      : norm > c.change_clip() ? c.change_clip() / norm
                                               : 1.0;
  const double weight =
      c.weight_cap() > 0
          ? std::min(static_cast<double>(num_examples), c.weight_cap()) / c.weight_cap()
          : 1.0;
  for (double& v : x) v *= clip * weight;
  spdlog::info("round {}: secure aggregation: {} of norm {:.6g}{}", round, what, norm,
               c.unit_norm() ? std::string(", scaled to 1")
               : clip < 1    ? StrCat(", clipped to ", c.change_clip())
                             : std::string());
  return x;
}

absl::Status Node::AdvertiseKeys(const v1::Task& task, const v1::SecAggConfig& c,
                                 std::string_view what, std::vector<double> x, int64_t num_examples,
                                 const v1::TrainMetrics& metrics, const std::atomic<bool>& stop) {
  secure_.reset();
  const std::vector<double> input = SecureInput(c, task.round(), what, std::move(x), num_examples);
  ASSIGN_OR_RETURN(secagg::Encoded encoded, secagg::Encode(input, c));
  spdlog::info("round {}: secure aggregation: {} values quantised to {} of {} bits{}", task.round(),
               input.size(), encoded.words.size(), c.bits(),
               c.noise_num() > 0 ? ", with this client's share of the DP noise" : "");
  // Who this client is, what it signs with, and whom it trusts.
  ASSIGN_OR_RETURN(const std::string cert, common::ReadFileToString(options_.cert_file));
  ASSIGN_OR_RETURN(const common::CertificateId id, common::IdentifyCertificate(cert));
  ASSIGN_OR_RETURN(secagg::Signer signer, secagg::Signer::FromPemFile(options_.key_file));
  ASSIGN_OR_RETURN(const std::string ca, common::ReadFileToString(options_.peer_ca_file));
  ASSIGN_OR_RETURN(secagg::PeerVerifier verifier, secagg::PeerVerifier::FromCaPem(ca));
  ASSIGN_OR_RETURN(secagg::ClientSession session,
                   secagg::ClientSession::Create(c, id.cn, std::move(signer), std::move(verifier)));
  secure_ = std::make_unique<SecureTask>(
      SecureTask{std::move(session), std::move(encoded.words), task, metrics, num_examples});
  if (options_.before_secagg_step) options_.before_secagg_step("keys");
  ASSIGN_OR_RETURN(v1::SecAggKeys keys, secure_->session.AdvertiseKeys());
  v1::SecAggRequest request;
  *request.mutable_keys() = std::move(keys);
  request.set_instance(c.instance());
  return SendSecAgg(task.round(), std::move(request), stop);
}

absl::Status Node::SendSecAgg(int64_t round, v1::SecAggRequest request,
                              const std::atomic<bool>& stop) {
  request.set_round(round);
  v1::SecAggResponse response;
  grpc::Status s =
      Retry([&](grpc::ClientContext& c) { return stub_->SecAgg(&c, request, &response); }, stop);
  if (ReasonOf(s) == v1::ErrorDetail::STALE_TASK) {
    secure_.reset();
    return absl::AbortedError(StrCat("round ", round, ": ", s.error_message()));
  }
  return FromGrpc(s, StrCat("secure aggregation of round ", round));
}

absl::Status Node::SecureCorrection(const v1::Task& task, const std::atomic<bool>& stop) {
  const v1::SecAggStep& step = task.secagg();
  const v1::SecAggCorrection& correction = step.correction();
  const v1::SecAggConfig& c = correction.config();
  // What this client puts in, or why it cannot: then it declines the second sum (its input is in
  // the first) and takes part again from the next round.
  absl::StatusOr<std::vector<double>> terms = [&]() -> absl::StatusOr<std::vector<double>> {
    if (!trained_ || trained_->instance != step.instance())
      return absl::FailedPreconditionError(
          "this process holds no factors trained for the first sum (it restarted since)");
    // Only after the first sum, and only among its survivors as this client signed them.
    if (!trained_->revealed)
      return absl::FailedPreconditionError("the first sum was not unmasked with this client yet");
    for (const std::string& id : c.cohort())
      if (!std::binary_search(trained_->survivors.begin(), trained_->survivors.end(), id))
        return absl::FailedPreconditionError(
            StrCat(id, " is in the second sum's cohort but did not survive the first"));
    if (options_.before_secagg_step) options_.before_secagg_step("correction");
    ASSIGN_OR_RETURN(const std::string bytes, DownloadBlob(correction.mean(), stop));
    ASSIGN_OR_RETURN(const Adapter mean, common::DecodeAdapter(bytes, "the first sum's Ā"));
    const Adapter& mine = trained_->adapter;
    const Adapter& start = trained_->start;  // the round's, scaling 1
    std::vector<double> x;
    for (size_t i = 0; i < start.num_modules(); ++i) {
      const common::LoraModule& want = start.module(i);
      const std::optional<size_t> j = mine.FindModule(want.name), k = mean.FindModule(want.name);
      if (!j || !k || mean.module(*k).rank != want.rank ||
          mean.module(*k).in_features != want.in_features)
        return absl::InvalidArgumentError(
            StrCat("the first sum's Ā lacks module ", want.name, " of the round's shape"));
      const common::MatrixD a_bar = mean.A(*k).cast<double>();
      const common::MatrixD g =
          common::ProjectedProduct(mine, *j, a_bar) - common::ProjectedProduct(start, i, a_bar);
      x.insert(x.end(), g.data(), g.data() + g.size());
    }
    if (static_cast<int64_t>(x.size()) != c.length())
      return absl::InvalidArgumentError(StrCat("the second sum asks for ", c.length(),
                                               " values; this client's factors give ", x.size()));
    return x;
  }();
  if (!terms.ok()) {
    if (absl::IsCancelled(terms.status())) return terms.status();
    v1::SecAggRequest decline;
    decline.set_instance(c.instance());
    decline.set_decline(StrCat("lora-fair's second sum: ", terms.status().message()));
    spdlog::warn("round {}: {}; declining it", task.round(), decline.decline());
    return SendSecAgg(task.round(), std::move(decline), stop);
  }
  RETURN_IF_ERROR(AdvertiseKeys(trained_->task, c, "lora-fair's correction term", *std::move(terms),
                                trained_->num_examples, trained_->metrics, stop));
  trained_.reset();
  return absl::OkStatus();
}

absl::Status Node::SecureStep(const v1::Task& task, const std::atomic<bool>& stop) {
  const v1::SecAggStep& step = task.secagg();
  if (step.has_correction()) return SecureCorrection(task, stop);
  v1::SecAggRequest request;
  request.set_instance(step.instance());
  if (!secure_ || secure_->session.instance().config().instance() != step.instance()) {
    request.set_decline(
        "this process holds no keys of the instance (it restarted since it trained); it takes "
        "part again from the next round");
    spdlog::warn("round {}: {}", task.round(), request.decline());
    return SendSecAgg(task.round(), std::move(request), stop);
  }
  secagg::ClientSession& session = secure_->session;
  static constexpr std::string_view kSteps[] = {"", "", "shares", "input", "consent", "reveal"};
  if (options_.before_secagg_step && step.step_case() < std::size(kSteps))
    options_.before_secagg_step(kSteps[step.step_case()]);
  absl::Status done = [&]() -> absl::Status {
    switch (step.step_case()) {
      case v1::SecAggStep::kRoster: {
        ASSIGN_OR_RETURN(*request.mutable_shares(), session.ShareKeys(step.roster()));
        return SendSecAgg(task.round(), std::move(request), stop);
      }
      case v1::SecAggStep::kInbox: {
        ASSIGN_OR_RETURN(const std::vector<uint64_t> masked,
                         session.MaskInput(step.inbox(), secure_->words));
        const std::string bytes = secagg::PackWords(masked, session.instance().config().bits());
        return UploadUpdate(secure_->task, bytes, secure_->metrics, secure_->num_examples, stop);
      }
      case v1::SecAggStep::kSurvivors: {
        ASSIGN_OR_RETURN(*request.mutable_consent(), session.Consent(step.survivors()));
        if (trained_ && trained_->instance == step.instance()) {
          trained_->survivors.assign(step.survivors().clients().begin(),
                                     step.survivors().clients().end());
          std::sort(trained_->survivors.begin(), trained_->survivors.end());
        }
        return SendSecAgg(task.round(), std::move(request), stop);
      }
      case v1::SecAggStep::kConsents: {
        ASSIGN_OR_RETURN(*request.mutable_reveal(), session.Unmask(step.consents()));
        RETURN_IF_ERROR(SendSecAgg(task.round(), std::move(request), stop));
        spdlog::info("round {}: secure aggregation: shares revealed for the sum", task.round());
        if (trained_ && trained_->instance == step.instance()) trained_->revealed = true;
        secure_.reset();
        return absl::OkStatus();
      }
      default:
        return absl::InvalidArgumentError("a secure aggregation task without a step");
    }
  }();
  if (absl::IsPermissionDenied(done)) {
    secure_.reset();
    return absl::PermissionDeniedError(StrCat("round ", task.round(),
                                              ": secure aggregation: ", done.message(),
                                              "; this client stops, revealing nothing more"));
  }
  if (absl::IsFailedPrecondition(done) && secure_) {  // too few neighbours or consents left
    spdlog::warn("round {}: secure aggregation: {}; declining the round", task.round(),
                 done.message());
    secure_.reset();
    v1::SecAggRequest decline;
    decline.set_instance(step.instance());
    decline.set_decline(std::string(done.message()));
    return SendSecAgg(task.round(), std::move(decline), stop);
  }
  return done;
}

absl::Status Node::WriteFinalState() const {
  if (options_.out_dir.empty()) return absl::OkStatus();
  const std::filesystem::path dir = options_.out_dir;
  std::filesystem::create_directories(dir);
  RETURN_IF_ERROR(workload_->WriteFinalState(dir));
  if (global_.num_modules() > 0) {
    RETURN_IF_ERROR(common::WritePeftAdapter(global_, dir / "global", {common::DType::kF32, true}));
  }
  return absl::OkStatus();
}

absl::Status Node::Run(const std::atomic<bool>& stop) {
  RETURN_IF_ERROR(JoinCoordinator(stop));
  while (!stop) {
    v1::GetTaskRequest request;
    request.set_have_version(have_version_);
    request.set_max_wait_ms(5000);
    v1::Task task;
    grpc::Status s = Retry(
        [&](grpc::ClientContext& c) {
          c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
          return stub_->GetTask(&c, request, &task);
        },
        stop);
    if (ReasonOf(s) == v1::ErrorDetail::NOT_JOINED) {
      RETURN_IF_ERROR(JoinCoordinator(stop));  // the coordinator restarted and forgot us
      continue;
    }
    if (stop) break;
    RETURN_IF_ERROR(FromGrpc(s, "get task"));
    switch (task.kind()) {
      case v1::Task::WAIT:
        continue;
      case v1::Task::DONE:
        RETURN_IF_ERROR(Apply(task, stop));
        RETURN_IF_ERROR(WriteFinalState());
        spdlog::info("run done at version {}", have_version_);
        return absl::OkStatus();
      case v1::Task::TRAIN:
      case v1::Task::SKETCH: {
        if (task.kind() == v1::Task::TRAIN) RETURN_IF_ERROR(Apply(task, stop));
        absl::Status trained =
            task.kind() == v1::Task::TRAIN ? Train(task, stop) : Sketch(task, stop);
        // The site's privacy budget is spent, or it cannot do what the run asks: it leaves.
        if (absl::IsResourceExhausted(trained) || absl::IsUnimplemented(trained)) {
          spdlog::warn("round {}: {}; leaving the run", task.round(), trained.message());
          Leave(task, std::string(trained.message()));
          return absl::OkStatus();
        }
        // This identity is refused, or used by a later process: retrying cannot help.
        if (absl::IsPermissionDenied(trained) || absl::IsUnauthenticated(trained)) return trained;
        if (absl::IsAborted(trained)) {  // too late for its round: take the next task
          spdlog::warn("{}; asking for the next task", trained.message());
          continue;
        }
        if (!trained.ok()) {
          // A failed training or a refused update: back off, and give up after three in a row (a
          // deterministic failure would otherwise repeat forever), leaving the run so that the
          // coordinator does not wait for this client.
          spdlog::error("round {}: {}", task.round(), trained.message());
          if (++failures_ >= 3) {
            Leave(task, StrCat("gave up after 3 failures in a row; the last: ", trained.message()));
            return trained;
          }
          std::this_thread::sleep_for(std::chrono::seconds(1 << failures_));
          continue;
        }
        failures_ = 0;
        continue;
      }
      case v1::Task::SECAGG: {
        absl::Status stepped = SecureStep(task, stop);
        if (absl::IsPermissionDenied(stepped) || absl::IsUnauthenticated(stepped)) return stepped;
        if (!stepped.ok()) spdlog::warn("{}", stepped.message());
        continue;
      }
      default:
        return absl::InternalError(StrCat("unknown task kind ", static_cast<int>(task.kind())));
    }
  }
  return absl::CancelledError("stopped");
}

}  // namespace fedlora::client
