#include "server/client_dp_rounds.h"

#include <spdlog/spdlog.h>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/privacy/private_sketch.h"

namespace fedlora::server {

using common::Method;
using common::StrCat;

absl::StatusOr<ClientDpRounds> ClientDpRounds::Create(const ServerOptions& options) {
  ASSIGN_OR_RETURN(common::GaussianNoise noise, common::GaussianNoise::Secure());
  return ClientDpRounds(options, std::move(noise));
}

common::PrivacyRound ClientDpRounds::Entry() const {
  return {round_number_, sample_rate_, options_->dp_noise_multiplier,
          options_->method == Method::kLoraFair ? 2.0 : 1.0};
}

absl::StatusOr<common::AdaptiveClipper> ClientDpRounds::ClipperFor(double clip,
                                                                   double expected) const {
  ASSIGN_OR_RETURN(
      common::AdaptiveClipper clipper,
      common::AdaptiveClipper::Create({clip, options_->dp_target_quantile,
                                       options_->dp_clip_learning_rate, options_->dp_count_stddev},
                                      expected));
  RETURN_IF_ERROR(clipper.UpdateNoiseMultiplier(options_->dp_noise_multiplier).status());
  return clipper;
}

absl::StatusOr<nlohmann::json> ClientDpRounds::Spend(const common::PrivacyRound& entry,
                                                     double expected, double clip,
                                                     ClientDpState* state) const {
  state->rounds.push_back(entry);
  ASSIGN_OR_RETURN(common::PrivacySpent spent,
                   common::SpentOver(state->rounds, options_->dp_delta));
  return nlohmann::json{{"epsilon", spent.epsilon},
                        {"delta", options_->dp_delta},
                        {"order", spent.order},
                        {"sample_rate", entry.q},
                        {"expected_clients", expected},
                        {"noise_multiplier", entry.sigma},
                        {"clip", clip}};
}

absl::StatusOr<bool> ClientDpRounds::WithinTarget(const ClientDpState& state,
                                                  const common::PrivacyRound& entry,
                                                  std::string_view what,
                                                  std::string_view then) const {
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

absl::StatusOr<bool> ClientDpRounds::Start(const ClientDpState& state, int64_t round, size_t cohort,
                                           size_t population, common::Adapter start) {
  round_number_ = round;
  const double expected = static_cast<double>(cohort);
  sample_rate_ = expected / static_cast<double>(population);
  ASSIGN_OR_RETURN(const bool within,
                   WithinTarget(state, Entry(), StrCat("round ", round), "no more rounds are run"));
  if (!within) return false;
  // Refuse now, not at the close, a budget the count's noise would exceed.
  if (options_->dp_adaptive_clip) RETURN_IF_ERROR(ClipperFor(state.clip, expected).status());
  round_.emplace(std::move(start), state.clip, expected);
  return true;
}

absl::Status ClientDpRounds::Add(const common::Adapter& update) {
  return round_->Add(update).status();
}

absl::StatusOr<common::AggregateResult> ClientDpRounds::Finish(
    std::span<const common::Adapter> updates, ClientDpState* state, nlohmann::json* metrics) {
  const common::ClientDpRound& round = *round_;
  const double expected = round.expected_clients(), clip = round.clip();
  const double z = options_->dp_noise_multiplier;
  double z_update = z;
  std::optional<common::AdaptiveClipper> clipper;
  if (options_->dp_adaptive_clip) {
    ASSIGN_OR_RETURN(clipper, ClipperFor(clip, expected));
    ASSIGN_OR_RETURN(z_update, clipper->UpdateNoiseMultiplier(z));
  }
  common::AggregateResult result;
  result.adapter = round.Finish(z_update, noise_);
  if (options_->method == Method::kLoraFair) {
    ASSIGN_OR_RETURN(
        std::vector<common::LoraFairSolution> solutions,
        common::PrivateLoraFairCorrection(updates, round.start(), result.adapter, clip, z, expected,
                                          noise_, {.lambda = options_->lora_fair_lambda}));
    for (size_t i = 0; i < solutions.size(); ++i) {
      result.modules.push_back({.name = result.adapter.module(i).name,
                                .rank = result.adapter.module(i).rank,
                                .lora_fair = std::move(solutions[i])});
    }
  }
  if (clipper) clipper->Update(round.norms(), noise_);  // norms stay here: they are not private
  const double next_clip = clipper ? clipper->clip() : clip;
  state->clip = next_clip;
  ASSIGN_OR_RETURN(*metrics, Spend(Entry(), expected, clip, state));
  (*metrics)["update_noise_multiplier"] = z_update;
  (*metrics)["next_clip"] = next_clip;
  return result;
}

absl::StatusOr<bool> ClientDpRounds::StartSketchStep(const ClientDpState& state, int step,
                                                     size_t cohort, size_t population) {
  round_number_ = 0;
  sample_rate_ = static_cast<double>(cohort) / static_cast<double>(population);
  return WithinTarget(state, SketchEntry(), StrCat("fed-sb initialisation step ", step + 1),
                      "the run cannot be initialised within it");
}

void ClientDpRounds::AddSketchAnswer(const std::vector<common::MatrixD>& products,
                                     std::vector<common::MatrixD>& sums) {
  double norm_sq = 0;
  for (const common::MatrixD& p : products) norm_sq += p.squaredNorm();
  if (!(norm_sq > 0)) return;  // a zero answer adds nothing, scaled or not
  const double scale = 1 / std::sqrt(norm_sq);
  for (size_t i = 0; i < sums.size(); ++i) sums[i] += scale * products[i];
}

absl::StatusOr<std::vector<common::MatrixD>> ClientDpRounds::NoiseSketchStep(
    std::vector<common::MatrixD> sums, size_t cohort, ClientDpState* state,
    nlohmann::json* metrics) {
  const common::PrivacyRound entry = SketchEntry();
  common::NoisyMean(sums, entry.sigma, static_cast<double>(cohort), noise_);
  ASSIGN_OR_RETURN(*metrics, Spend(entry, static_cast<double>(cohort), 1.0, state));
  return sums;
}

}  // namespace fedlora::server
