// The one check every update passes before it can reach the aggregate: its bytes match the sha256
// the client announced, decode as a safetensors adapter, hold exactly the task's modules at the
// run's rank (for fed-sb: exactly one [r, r] lora_R per module) and only finite values.
#ifndef FEDLORA_SERVER_UPDATE_VALIDATOR_H_
#define FEDLORA_SERVER_UPDATE_VALIDATOR_H_

#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "common/aggregation/aggregate.h"
#include "server/state_store.h"

namespace fedlora::server {

// A complete upload in the store's part file `part`: hashed and synced on one core while `decode`
// reads and checks its bytes on another. A checksum mismatch is the error reported when there is
// one (a damaged transfer explains any other finding); then `decode`'s. Safe without the engine's
// lock.
absl::Status VerifyPart(const StateStore& store, const std::string& part, const std::string& sha256,
                        const std::string& origin,
                        const std::function<absl::Status(std::string_view bytes)>& decode);

class UpdateValidator {
 public:
  UpdateValidator() = default;
  // `shapes`: the task's modules at the run's rank; `frozen`: Fed-SB's shared B and A.
  // `scaling`: the task's lora_alpha / r, which every update's modules must carry.
  UpdateValidator(common::Method method, std::vector<common::ModuleShape> shapes,
                  common::Adapter frozen, double scaling)
      : method_(method),
        shapes_(std::move(shapes)),
        frozen_(std::move(frozen)),
        scaling_(scaling) {}

  // The update in `bytes`, decoded and checked; INVALID_ARGUMENT naming `origin`, the module and
  // both shapes otherwise. `rank`, when given, is the client's own (FLoRA's heterogeneous ranks):
  // its modules have that rank and the scaling lora_alpha / rank.
  absl::StatusOr<common::Adapter> Decode(std::string_view bytes, const std::string& origin,
                                         int rank = 0) const;

  // VerifyPart with Decode.
  absl::StatusOr<common::Adapter> Verify(const StateStore& store, const std::string& part,
                                         const std::string& sha256, const std::string& origin,
                                         int rank = 0) const;

 private:
  common::Method method_ = common::Method::kFedIt;
  std::vector<common::ModuleShape> shapes_;
  common::Adapter frozen_;
  double scaling_ = 0;
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_UPDATE_VALIDATOR_H_
