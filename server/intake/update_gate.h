// The one check every update passes before it can reach the aggregate (DESIGN.md "Validation at
// the door"), in two stages, each ending in a typed Verdict:
//   Admit, under the engine's lock, for every chunk: a round is open and the update is for it (not
//     late, not for another round, Fed-SB initialisation step or state version), its sender is in
//     the cohort, and the announced size and sha256 are well formed and within the limit;
//   Check, outside the lock, once the last byte has arrived: the bytes' sha256, the decoding (a
//     safetensors adapter, or a Fed-SB initialisation step's products), exactly the task's
//     modules at the client's rank and scaling, finite values, the example claim and the absolute
//     norm bound — and the update's aggregation weight.
// The call's session is checked before either (RoundEngine::CheckSession). A gate is made when a
// round opens and never changes, so Check needs no lock; it also decodes accepted updates back
// from the store for the round's accumulator (UpdateSource).
#ifndef FEDLORA_SERVER_INTAKE_UPDATE_GATE_H_
#define FEDLORA_SERVER_INTAKE_UPDATE_GATE_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "common/tensor/blob.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/accumulate/accumulator.h"
#include "server/server_options.h"
#include "server/state_store.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

// What the gate says of an upload: admitted, or refused with the reason a client acts on.
struct Verdict {
  v1::ErrorDetail::Reason reason = v1::ErrorDetail::REASON_UNSPECIFIED;
  absl::Status status;
  // A REJECTED update's kind, for the metrics (fedlora_rejections_total's reason label).
  std::string_view kind;

  static Verdict Admitted() { return {}; }
  static Verdict Refused(v1::ErrorDetail::Reason reason, absl::Status status,
                         std::string_view kind = "") {
    return {reason, std::move(status), kind};
  }
  bool ok() const { return status.ok(); }
  // The status with its reason attached (server/errors.h), as the client receives it.
  absl::Status ToStatus() const;
};

// The round as Admit sees it (the engine's state, read under its lock).
struct RoundView {
  bool open = false;     // a round or initialisation step takes updates
  bool done = false;     // the run is over
  bool closing = false;  // the round is closing: its commit is being retried
  int64_t round = 0;     // the round open, or next
  int init_step = -1;    // the Fed-SB initialisation step open (round 0), or -1
  int64_t version = 0;   // the version the round trains from
  const std::vector<std::string>* cohort = nullptr;  // sorted
};

// What Check knows of the sender, read under the lock with the upload's last chunk.
struct Sender {
  std::string client;
  int rank = 0;           // the rank it trains (--client-ranks, else the run's)
  int64_t joined = 0;     // the examples it joined with
  bool accepted = false;  // its update for this round was accepted already
};

// An update that passed Check.
struct CheckedUpdate {
  int64_t weight = 0;  // the examples it claims (its join's when it claims none), within the cap
  double norm = 0;     // ‖s·B·A‖_F flat over the modules, when a norm bound asks for it
};

class UpdateGate final : public UpdateSource {
 public:
  // `shapes`: the task's modules at the run's rank (LoRA-SB modules for fed-sb); `frozen`:
  // Fed-SB's shared B and A; `sketch`: during a Fed-SB initialisation step, its products' shapes;
  // `weight_cap`: the round's cap on an update's weight (server/cohort.h); `masked_bytes`: under
  // secure aggregation, the size of a masked input, which is all Check can check of one (and
  // what MaxBytes is). `store` and `options` must outlive the gate.
  UpdateGate(const ServerOptions* options, const StateStore* store,
             std::vector<common::ModuleShape> shapes, std::shared_ptr<const common::Adapter> frozen,
             std::optional<std::vector<common::MatrixShape>> sketch, double weight_cap,
             std::optional<int64_t> masked_bytes = std::nullopt);

  // Needs no gate: a chunk may come when no round is open (late, or stale).
  static Verdict Admit(const RoundView& round, const Sender& sender,
                       const v1::UploadRequest& request, int64_t max_update_bytes);
  // The complete upload in the store's part file `part`; fills `checked` when it passes.
  Verdict Check(const Sender& sender, const v1::UploadRequest& request, const std::string& part,
                CheckedUpdate* checked) const;

  // An update as the task's shapes say (`rank` > 0: another rank than the run's, at the same
  // lora_alpha), or INVALID_ARGUMENT naming `origin`, the module and both shapes; in `reuse`'s
  // memory where it is large enough.
  absl::StatusOr<common::Adapter> Decode(std::string_view bytes, const std::string& origin,
                                         int rank = 0, common::Adapter reuse = {}) const;

  // UpdateSource: accepted updates read back from the store.
  absl::StatusOr<common::Adapter> Update(const AcceptedUpdate& update,
                                         common::Adapter reuse) const override;
  absl::StatusOr<std::vector<common::MatrixD>> Products(
      const AcceptedUpdate& update) const override;

  bool sketch() const { return sketch_.has_value(); }
  // The most bytes the task's update can take (Admit's limit): its tensors in f32 at `rank` (0:
  // the run's) — A and B, Fed-SB's R, or a step's products — plus room for the safetensors header,
  // within --max-update-bytes. A member cannot make the coordinator store, map and hash more.
  int64_t MaxBytes(int rank) const;

 private:
  // The update's scaling lora_alpha / r that every module must carry.
  double Scaling(int rank) const;

  const ServerOptions* options_;
  const StateStore* store_;
  const std::vector<common::ModuleShape> shapes_;
  const std::shared_ptr<const common::Adapter> frozen_;
  const std::optional<std::vector<common::MatrixShape>> sketch_;
  const double weight_cap_;
  const std::optional<int64_t> masked_bytes_;
};

// A complete upload in the store's part file `part`: hashed and synced on one core while `decode`
// reads and checks its bytes on another. A checksum mismatch is the error reported when there is
// one (a damaged transfer explains any other finding); then `decode`'s.
absl::Status VerifyPart(const StateStore& store, const std::string& part, const std::string& sha256,
                        const std::string& origin,
                        const std::function<absl::Status(std::string_view bytes)>& decode);

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_INTAKE_UPDATE_GATE_H_
