#include "server/round/run_setup.h"

#include <spdlog/spdlog.h>

#include <random>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/tensor/blob.h"
#include "common/tensor/linalg.h"
#include "server/fed_sb_init.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::Method;
using common::StrCat;

// The client's modules that --target-modules names (all when it names none).
absl::StatusOr<std::vector<ModuleSpec>> RunModules(const ServerOptions& options,
                                                   const fedlora::v1::JoinRequest& first) {
  std::vector<ModuleSpec> modules;
  for (const fedlora::v1::ModuleSpec& m : first.modules()) {
    bool wanted = options.target_modules.empty();
    for (const std::string& t : options.target_modules)
      wanted |= m.name().ends_with("." + t) || m.name() == t;
    if (wanted) modules.push_back({m.name(), m.in_features(), m.out_features()});
  }
  if (modules.empty()) {
    return absl::InvalidArgumentError(
        StrCat("none of the client's ", first.modules_size(), " modules matches target_modules ",
               fmt::format("{}", fmt::join(options.target_modules, ","))));
  }
  // What the run would ask each client to send, before anything is allocated for it.
  int64_t floats = 0;
  for (const ModuleSpec& m : modules) {
    floats += int64_t{options.rank} * (m.in_features + m.out_features + options.rank);
    if (options.method == Method::kFedSb &&
        options.rank > std::min(m.in_features, m.out_features)) {
      return absl::InvalidArgumentError(
          StrCat("fed-sb's B (m×r) and A (r×n) have orthonormal columns and rows, so rank ",
                 options.rank, " cannot exceed module ", m.name, "'s ", m.out_features, "x",
                 m.in_features, "; choose target_modules or a lower rank"));
    }
  }
  if (floats * 4 > options.max_update_bytes) {
    return absl::InvalidArgumentError(
        StrCat("an adapter of the client's ", modules.size(), " modules at rank ", options.rank,
               " takes ", floats * 4, " bytes, more than max_update_bytes (",
               options.max_update_bytes, "); choose target_modules or raise the limit"));
  }
  return modules;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const Adapter>> CreateRun(const ServerOptions& options,
                                                         const fedlora::v1::JoinRequest& first,
                                                         StateStore& store) {
  const Method method = options.method;
  Ledger ledger;
  std::mt19937_64 rng(options.seed ^ 0x5eedf00dull);
  ledger.run_id = fmt::format("{}-{:016x}", MethodName(method),
                              common::Fnv1a(StrCat(options.seed, first.base_model_sha256())));
  ledger.method = method;
  ledger.base_model_sha256 = first.base_model_sha256();
  ASSIGN_OR_RETURN(ledger.modules, RunModules(options, first));
  if (options.client_dp()) ledger.client_dp = ClientDpState{options.dp_clip, {}};
  ledger.init = NewFedSbInit(options);
  auto frozen = std::make_shared<Adapter>();
  if (ledger.init) {
    // B, A and R0 from the clients' gradient, in round 0 (fed_sb_init.h); version 0 comes last.
    RETURN_IF_ERROR(store.SaveLedger(ledger));
    spdlog::info(
        "run {} created: base model {}, {} modules, rank {}; fed-sb initialises from the clients' "
        "gradient over {} records each ({}, {} steps)",
        ledger.run_id, ledger.base_model_sha256, ledger.modules.size(), options.rank,
        ledger.init->examples,
        ledger.init->mode == FedSbInit::Mode::kDense
            ? "dense"
            : StrCat("sketch of width ", ledger.init->columns),
        ledger.init->total_steps());
    return frozen;
  }
  // Version 0, the state every client starts from (flora's clients start from the base alone).
  Version v0{0, {}, std::nullopt, std::nullopt};
  if (method == Method::kFedIt || method == Method::kLoraFair) {
    ASSIGN_OR_RETURN(Adapter init, Adapter::Create(ledger.Shapes(options.rank, false)));
    for (size_t i = 0; i < init.num_modules(); ++i) common::InitLoraA(init.A(i), rng);
    ASSIGN_OR_RETURN(BlobRef blob,
                     store.PutBlob(common::EncodeAdapter(init), BlobKind::kAdapter, 0));
    v0.blobs.push_back(std::move(blob));
  } else if (method == Method::kFedSb) {  // fed_sb_init = random: B, A orthonormal, R0 = 0
    ASSIGN_OR_RETURN(*frozen, Adapter::Create(ledger.Shapes(options.rank, true)));
    for (size_t i = 0; i < frozen->num_modules(); ++i) {
      const auto& m = frozen->module(i);
      frozen->B(i) = common::RandomOrthonormal(m.out_features, m.rank, rng).cast<float>();
      frozen->A(i) =
          common::RandomOrthonormal(m.in_features, m.rank, rng).transpose().cast<float>();
    }
    spdlog::info(
        "fed-sb: frozen B and A are random orthonormal matrices drawn from the run's seed (R "
        "starts at 0): fed_sb_init = random");
    ASSIGN_OR_RETURN(BlobRef blob,
                     store.PutBlob(common::EncodeAdapter(*frozen), BlobKind::kFrozen, 0));
    v0.blobs.push_back(std::move(blob));
  }
  ledger.versions.push_back(std::move(v0));
  RETURN_IF_ERROR(store.SaveLedger(ledger));
  spdlog::info(
      "run {} created: base model {}, {} modules, rank {}, lora_alpha {}, {} local steps at "
      "learning rate {}",
      ledger.run_id, ledger.base_model_sha256, ledger.modules.size(), options.rank,
      options.lora_alpha, options.local_steps, options.learning_rate);
  return frozen;
}

}  // namespace fedlora::server
