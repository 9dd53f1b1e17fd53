// A client node: joins the coordinator, long-polls for tasks, brings its state up to the task's
// version (only the blobs it lacks, each resumed from its offset after a broken transfer and
// verified by sha256), trains, and uploads its update (resumable, idempotent). Transient failures
// (UNAVAILABLE, DEADLINE_EXCEEDED) are retried with exponential backoff; a coordinator restart is
// survived by re-joining.
#ifndef FEDLORA_CLIENT_NODE_H_
#define FEDLORA_CLIENT_NODE_H_

#include <atomic>
#include <functional>
#include <memory>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "client/workloads/workload.h"
#include "common/aggregation/aggregate.h"
#include "common/tensor/adapter.h"
#include "fedlora/v1/coordinator.grpc.pb.h"

namespace fedlora::client {

struct NodeOptions {
  // used only with --insecure (sent as metadata); with TLS the certificate names us
  std::string id;
  int64_t chunk_bytes = 1 << 20;  // upload / download chunk size (at most the coordinator's)
  double max_retry_s = 300;       // give up after retrying a call this long
  std::string out_dir;            // where the final state is written on DONE (empty: nowhere)
  // Called before each chunk of an upload is sent, with its offset and the update's size (an
  // instrumentation point for fault tests; empty in fedlora-client).
  std::function<void(int64_t offset, int64_t total)> before_upload_chunk;
  // Called with each trained update and the example count it claims, before it is encoded (an
  // instrumentation point: the fault tests' hostile clients; empty in fedlora-client).
  std::function<void(common::Adapter& update, int64_t& num_examples)> before_upload;
  // Called before each step this client takes in a secure aggregation: "keys", "shares", "input",
  // "consent", "reveal" (an instrumentation point for fault tests; empty in fedlora-client).
  std::function<void(std::string_view step)> before_secagg_step;
  // Called with each transient failure of a call: PERMISSION_DENIED when it is in fact a refusal of
  // this client that no retry can change (common::ProbeTlsRefusal), which ends the run with it.
  std::function<absl::Status(const grpc::Status&)> diagnose_refusal;
  // Secure aggregation: this client's TLS certificate and key (it signs its protocol keys with the
  // key; the certificate's common name is its identity there) and the CA of its peers'
  // certificates.
  std::string cert_file, key_file, peer_ca_file;
};

class Node {
 public:
  Node(std::shared_ptr<grpc::Channel> channel, const NodeOptions& options,
       std::unique_ptr<Workload> workload);

  // Runs until the coordinator says DONE (OK), `stop` is set (CANCELLED), or an error that retrying
  // cannot fix.
  absl::Status Run(const std::atomic<bool>& stop);

 private:
  absl::Status JoinCoordinator(const std::atomic<bool>& stop);
  absl::Status Apply(const v1::Task& task, const std::atomic<bool>& stop);
  absl::StatusOr<std::string> DownloadBlob(const v1::BlobRef& ref, const std::atomic<bool>& stop);
  absl::Status Train(const v1::Task& task, const std::atomic<bool>& stop);
  // Fed-SB's initialisation step: the product the task asks of this site's gradient, uploaded.
  absl::Status Sketch(const v1::Task& task, const std::atomic<bool>& stop);
  // Runs `work`, sending heartbeats for the task meanwhile; false when the coordinator said it no
  // longer waits for the task's answer.
  bool WhileHeartbeating(const v1::Task& task, const std::function<void()>& work);
  // Tells the coordinator this client leaves the run, and why.
  void Leave(const v1::Task& task, const std::string& reason);
  // Uploads the encoded update `bytes`, claiming `num_examples`.
  absl::Status UploadUpdate(const v1::Task& task, const std::string& bytes,
                            const v1::TrainMetrics& metrics, int64_t num_examples,
                            const std::atomic<bool>& stop);
  absl::Status WriteFinalState() const;
  // Secure aggregation (common/secagg/): after training for `task`, the change quantised and the
  // protocol's keys advertised; then each SECAGG task's step. A protocol violation seen (the
  // coordinator relayed a forged key or showed two survivor sets) is PERMISSION_DENIED: the node
  // stops and reveals nothing.
  // `x` (`what`: a change, a sketch step's answer, lora-fair's correction term) as `config` wants
  // it: scaled to norm 1 or clipped, and weighted.
  std::vector<double> SecureInput(const v1::SecAggConfig& config, int64_t round,
                                  std::string_view what, std::vector<double> x,
                                  int64_t num_examples) const;
  // `x` made the input `config` wants (SecureInput) and quantised; then the keys of `config`'s
  // instance advertised, the answer to `task`.
  absl::Status AdvertiseKeys(const v1::Task& task, const v1::SecAggConfig& config,
                             std::string_view what, std::vector<double> x, int64_t num_examples,
                             const v1::TrainMetrics& metrics, const std::atomic<bool>& stop);
  // lora-fair's second secure sum (SecAggCorrection), from the factors this client trained.
  absl::Status SecureCorrection(const v1::Task& task, const std::atomic<bool>& stop);
  absl::Status SecureStep(const v1::Task& task, const std::atomic<bool>& stop);
  absl::Status SendSecAgg(int64_t round, v1::SecAggRequest request, const std::atomic<bool>& stop);
  // Names this client's session on `context`, and the client itself when there is no certificate
  // to (--insecure with --id).
  void Identify(grpc::ClientContext& context) const;
  // Runs `call` (a gRPC call on a fresh context) until it succeeds, fails for good, or retrying
  // runs out.
  grpc::Status Retry(const std::function<grpc::Status(grpc::ClientContext&)>& call,
                     const std::atomic<bool>& stop);

  std::unique_ptr<v1::Coordinator::Stub> stub_;
  NodeOptions options_;
  std::unique_ptr<Workload> workload_;
  common::Method method_ = common::Method::kFedIt;
  int64_t have_version_ = -1;
  // the latest global adapter (fedit, lora-fair), or frozen B, A with R (fed-sb)
  common::Adapter global_;
  int failures_ = 0;     // consecutive failed tasks
  std::string session_;  // of the latest join
  struct SecureTask;     // the secure aggregation this client takes part in
  std::unique_ptr<SecureTask> secure_;
  // lora-fair: what the round's second secure sum needs, kept from the first's (its instance).
  struct Trained {
    std::string instance;
    common::Adapter adapter, start;
    v1::Task task;  // the training task: the second sum's upload answers it too
    v1::TrainMetrics metrics;
    int64_t num_examples = 0;
    std::vector<std::string> survivors;  // of the first sum, as this client signed them; sorted
    bool revealed = false;               // the first sum was unmasked with this client's shares
  };
  std::optional<Trained> trained_;
};

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_NODE_H_
