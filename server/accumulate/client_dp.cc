#include "server/accumulate/client_dp.h"

#include <spdlog/spdlog.h>

#include <cmath>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/privacy/private_sketch.h"
#include "common/secagg/dp.h"
#include "server/accumulate/every_factor.h"
#include "server/accumulate/sketch_sum.h"

namespace fedlora::server {
namespace {

using common::Adapter;
using common::ClientDpState;
using common::Method;
using common::StrCat;

// A round's private result: start + (Σ clip(Δ_k) + noise) / cohort, with LoRA-FAIR's private
// correction (a second Gaussian mechanism of the round) for lora-fair.
class PrivateMean final : public Accumulator {
 public:
  PrivateMean(ClientDp* dp, ClientDpState state, common::PrivacyRound entry, Adapter start,
              double expected)
      : dp_(dp),
        state_(std::move(state)),
        entry_(entry),
        start_(std::move(start)),
        expected_(expected) {}

  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override {
    const ServerOptions& o = dp_->options();
    const bool lora_fair = o.method == Method::kLoraFair;
    common::ClientDpRound round(start_, state_.clip, expected_);
    std::vector<Adapter> held;  // lora-fair's correction needs every client's factors
    RETURN_IF_ERROR(
        FoldUpdates(updates, source, [&](const AcceptedUpdate&, Adapter& update) -> absl::Status {
          RETURN_IF_ERROR(round.Add(update).status());
          if (lora_fair) held.push_back(std::move(update));
          return absl::OkStatus();
        }));
    const double clip = state_.clip, z = o.dp_noise_multiplier;
    double z_update = z;
    std::optional<common::AdaptiveClipper> clipper;
    if (o.dp_adaptive_clip) {
      ASSIGN_OR_RETURN(clipper, dp_->ClipperFor(clip, expected_));
      ASSIGN_OR_RETURN(z_update, clipper->UpdateNoiseMultiplier(z));
    }
    RoundOutput out;
    out.adapter = round.Finish(z_update, dp_->noise());
    if (lora_fair) {
      ASSIGN_OR_RETURN(
          std::vector<common::LoraFairSolution> solutions,
          common::PrivateLoraFairCorrection(held, start_, out.adapter, clip, z, expected_,
                                            dp_->noise(), {.lambda = o.lora_fair_lambda}));
      std::vector<common::ModuleReport> modules;
      for (common::LoraFairSolution& s : solutions) modules.push_back({.lora_fair = std::move(s)});
      SetLoraFairObjectives(modules, out);
    }
    if (clipper) clipper->Update(round.norms(), dp_->noise());  // norms stay here: not private
    ClientDpState state = state_;
    state.clip = clipper ? clipper->clip() : clip;
    ASSIGN_OR_RETURN(out.client_dp, dp_->Spend(entry_, expected_, clip, state));
    out.client_dp->update_noise_multiplier = z_update;
    out.client_dp->next_clip = state.clip;
    out.dp_state = std::move(state);
    out.aggregated = ClientsOf(updates);
    return out;
  }

 private:
  ClientDp* dp_;
  const ClientDpState state_;
  const common::PrivacyRound entry_;
  const Adapter start_;
  const double expected_;
};

// A private step of Fed-SB's initialisation (ClientDp::OpenSketchStep).
class PrivateSketch final : public Accumulator {
 public:
  PrivateSketch(ClientDp* dp, ClientDpState state, common::PrivacyRound entry, size_t cohort,
                std::vector<common::MatrixShape> shapes)
      : dp_(dp),
        state_(std::move(state)),
        entry_(entry),
        cohort_(static_cast<double>(cohort)),
        shapes_(std::move(shapes)) {}

  absl::StatusOr<RoundOutput> Aggregate(const std::vector<AcceptedUpdate>& updates,
                                        const UpdateSource& source) override {
    RoundOutput out;
    out.sums = ZeroSums(shapes_);
    RETURN_IF_ERROR(FoldProducts(
        updates, source, [&](const AcceptedUpdate&, std::vector<common::MatrixD>& products) {
          double norm_sq = 0;
          for (const common::MatrixD& p : products) norm_sq += p.squaredNorm();
          if (!(norm_sq > 0)) return absl::OkStatus();  // a zero answer adds nothing
          const double scale = 1 / std::sqrt(norm_sq);
          for (size_t i = 0; i < out.sums.size(); ++i) out.sums[i] += scale * products[i];
          return absl::OkStatus();
        }));
    common::NoisyMean(out.sums, entry_.sigma, cohort_, dp_->noise());
    out.weight = 1;
    ClientDpState state = state_;
    ASSIGN_OR_RETURN(out.client_dp, dp_->Spend(entry_, cohort_, 1.0, state));
    out.dp_state = std::move(state);
    out.aggregated = ClientsOf(updates);
    return out;
  }

 private:
  ClientDp* dp_;
  const ClientDpState state_;
  const common::PrivacyRound entry_;
  const double cohort_;
  const std::vector<common::MatrixShape> shapes_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ClientDp>> ClientDp::Create(const ServerOptions& options) {
  ASSIGN_OR_RETURN(common::GaussianNoise noise, common::GaussianNoise::Secure());
  return std::unique_ptr<ClientDp>(new ClientDp(options, std::move(noise)));
}

absl::StatusOr<common::AdaptiveClipper> ClientDp::ClipperFor(double clip, double expected) const {
  ASSIGN_OR_RETURN(
      common::AdaptiveClipper clipper,
      common::AdaptiveClipper::Create({clip, options_->dp_target_quantile,
                                       options_->dp_clip_learning_rate, options_->dp_count_stddev},
                                      expected));
  RETURN_IF_ERROR(clipper.UpdateNoiseMultiplier(options_->dp_noise_multiplier).status());
  return clipper;
}

absl::StatusOr<common::ClientDpSpend> ClientDp::Spend(const common::PrivacyRound& entry,
                                                      double expected, double clip,
                                                      ClientDpState& state) const {
  state.rounds.push_back(entry);
  ASSIGN_OR_RETURN(common::PrivacySpent spent, common::SpentOver(state.rounds, options_->dp_delta));
  common::ClientDpSpend s;
  if (std::isfinite(spent.epsilon)) s.epsilon = spent.epsilon;
  s.delta = options_->dp_delta;
  s.order = spent.order;
  s.sample_rate = entry.q;
  s.expected_clients = expected;
  s.noise_multiplier = entry.sigma;
  s.clip = clip;
  return s;
}

common::PrivacyRound ClientDp::SecureEntry(int64_t round, double q, const v1::SecAggConfig& config,
                                           int summands) {
  const double dim =
      static_cast<double>(secagg::RotatedLength(static_cast<size_t>(config.length())));
  const double l2 = config.clip() * config.scale() + std::sqrt(dim);
  const double local_sigma =
      std::sqrt(static_cast<double>(config.noise_num()) / static_cast<double>(config.noise_den()));
  common::PrivacyRound entry{
      round, q,
      local_sigma * std::sqrt(static_cast<double>(summands)) / (config.clip() * config.scale()), 1};
  entry.ddg = common::DistributedGaussian{l2, std::min(l2 * l2, l2 * std::sqrt(dim)), local_sigma,
                                          summands, dim};
  return entry;
}

absl::StatusOr<bool> ClientDp::WithinTarget(const ClientDpState& state,
                                            const common::PrivacyRound& entry,
                                            std::string_view what, std::string_view then) const {
  if (!(options_->dp_target_epsilon > 0)) return true;
  common::PrivacyHistory rounds = state.rounds;
  rounds.push_back(entry);
  ASSIGN_OR_RETURN(common::PrivacySpent next, common::SpentOver(rounds, options_->dp_delta));
  if (next.epsilon <= options_->dp_target_epsilon) return true;
  spdlog::warn(
      "client-level DP: {} (q {:.4g}) would take epsilon to {:.4f} at delta {}, past the target "
      "{}; {}",
      what, entry.q, next.epsilon, options_->dp_delta, options_->dp_target_epsilon, then);
  return false;
}

absl::StatusOr<std::unique_ptr<Accumulator>> ClientDp::OpenRound(const ClientDpState& state,
                                                                 int64_t round, size_t cohort,
                                                                 size_t population, Adapter start) {
  const double expected = static_cast<double>(cohort);
  // LoRA-FAIR's correction is a second Gaussian mechanism of the round.
  const common::PrivacyRound entry{round, expected / static_cast<double>(population),
                                   options_->dp_noise_multiplier,
                                   options_->method == Method::kLoraFair ? 2.0 : 1.0};
  ASSIGN_OR_RETURN(const bool within,
                   WithinTarget(state, entry, StrCat("round ", round), "no more rounds are run"));
  if (!within) return nullptr;
  // Refuse now, not at the close, a budget the count's noise would exceed.
  if (options_->dp_adaptive_clip) RETURN_IF_ERROR(ClipperFor(state.clip, expected).status());
  return std::make_unique<PrivateMean>(this, state, entry, std::move(start), expected);
}

absl::StatusOr<std::unique_ptr<Accumulator>> ClientDp::OpenSketchStep(
    const ClientDpState& state, int step, size_t cohort, size_t population,
    std::vector<common::MatrixShape> shapes) {
  const common::PrivacyRound entry{0, static_cast<double>(cohort) / static_cast<double>(population),
                                   options_->init_noise_multiplier(), 1};
  ASSIGN_OR_RETURN(const bool within,
                   WithinTarget(state, entry, StrCat("fed-sb initialisation step ", step + 1),
                                "the run cannot be initialised within it"));
  if (!within) return nullptr;
  return std::make_unique<PrivateSketch>(this, state, entry, cohort, std::move(shapes));
}

}  // namespace fedlora::server
