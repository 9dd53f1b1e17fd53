#include "server/intake/update_gate.h"

#include <algorithm>
#include <cmath>
#include <future>

#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "server/errors.h"

namespace fedlora::server {

using common::StrCat;
using v1::ErrorDetail;

absl::Status Verdict::ToStatus() const {
  return reason == ErrorDetail::REASON_UNSPECIFIED ? status : WithReason(status, reason);
}

UpdateGate::UpdateGate(const ServerOptions* options, const StateStore* store,
                       std::vector<common::ModuleShape> shapes,
                       std::shared_ptr<const common::Adapter> frozen,
                       std::optional<std::vector<common::MatrixShape>> sketch, double weight_cap,
                       std::optional<int64_t> masked_bytes)
    : options_(options),
      store_(store),
      shapes_(std::move(shapes)),
      frozen_(std::move(frozen)),
      sketch_(std::move(sketch)),
      weight_cap_(weight_cap),
      masked_bytes_(masked_bytes) {}

Verdict UpdateGate::Admit(const RoundView& round, const Sender& sender,
                          const v1::UploadRequest& request, int64_t max_update_bytes) {
  // Late: its round (or initialisation step) closed, or is closing, before the update came.
  const bool closing = round.closing && !sender.accepted;
  const bool earlier_step =
      round.init_step >= 0 && request.round() == 0 && request.sketch_step() < round.init_step;
  if (request.round() < round.round || earlier_step ||
      (request.round() == round.round && (round.done || closing))) {
    return Verdict::Refused(
        ErrorDetail::LATE,
        absl::FailedPreconditionError(
            StrCat("round ", request.round(), " closed before this update arrived (late)",
                   round.open && !closing ? StrCat("; round ", round.round, " is open") : "")));
  }
  auto stale = [](absl::Status st) { return Verdict::Refused(ErrorDetail::STALE_TASK, st); };
  auto rejected = [](absl::Status st, std::string_view kind) {
    return Verdict::Refused(ErrorDetail::REJECTED, st, kind);
  };
  if (!round.open) {
    return stale(absl::FailedPreconditionError(
        StrCat("no round is open (upload for round ", request.round(), ")")));
  }
  if (request.round() != round.round) {
    return stale(absl::FailedPreconditionError(
        StrCat("upload for round ", request.round(), " but round ", round.round, " is open")));
  }
  if (round.init_step >= 0 && request.sketch_step() != round.init_step) {
    return stale(absl::FailedPreconditionError(StrCat("answer to initialisation step ",
                                                      request.sketch_step() + 1, " but step ",
                                                      round.init_step + 1, " is open")));
  }
  if (request.state_version() != round.version) {
    return stale(absl::FailedPreconditionError(
        StrCat("update trained from version ", request.state_version(), " but round ", round.round,
               " trains from version ", round.version)));
  }
  if (round.cohort == nullptr ||
      !std::binary_search(round.cohort->begin(), round.cohort->end(), sender.client)) {
    return stale(absl::PermissionDeniedError(
        StrCat(sender.client, " is not in round ", round.round, "'s cohort")));
  }
  if (request.total_size() <= 0) {  // regression: this was "exceeds the limit"
    return rejected(absl::InvalidArgumentError(StrCat("update of total size ", request.total_size(),
                                                      "; an update has at least one byte")),
                    "empty");
  }
  if (request.total_size() > max_update_bytes) {
    return rejected(
        absl::ResourceExhaustedError(StrCat(
            "update of ", request.total_size(), " bytes exceeds the limit of ", max_update_bytes,
            " bytes (the task's tensors in f32 and their header, within --max-update-bytes)")),
        "too_large");
  }
  if (!common::IsSha256Hex(request.sha256())) {
    return rejected(absl::InvalidArgumentError(StrCat("sha256 '", request.sha256().substr(0, 80),
                                                      request.sha256().size() > 80 ? "…" : "",
                                                      "' is not 64 lower-case hex digits")),
                    "header");
  }
  return Verdict::Admitted();
}

int64_t UpdateGate::MaxBytes(int rank) const {
  if (masked_bytes_) return *masked_bytes_;
  // The header: its length, the metadata, and per tensor a JSON entry of its name (under PEFT's
  // prefix and suffix), dtype, shape and offsets, with the module's scaling in the metadata.
  int64_t bytes = 8 + 4096;
  const auto tensor = [&](const std::string& name, int64_t values) {
    bytes += 4 * values + 2 * static_cast<int64_t>(name.size()) + 256;
  };
  if (sketch_) {
    for (const common::MatrixShape& m : *sketch_) tensor(m.name, m.rows * m.cols);
  } else {
    const int64_t r = rank > 0 ? rank : options_->rank;
    for (const common::ModuleShape& m : shapes_) {
      if (options_->method == common::Method::kFedSb) {
        tensor(m.name, r * r);
      } else {
        tensor(m.name, r * m.in_features);
        tensor(m.name, r * m.out_features);
      }
    }
  }
  return std::min(bytes, options_->max_update_bytes);
}

double UpdateGate::Scaling(int rank) const {
  return options_->lora_alpha / (rank > 0 ? rank : options_->rank);
}

absl::StatusOr<common::Adapter> UpdateGate::Decode(std::string_view bytes,
                                                   const std::string& origin, int rank,
                                                   common::Adapter reuse) const {
  if (options_->method == common::Method::kFedSb) {
    // R on the frozen factors, with the client's own scaling (the blob's metadata), which must be
    // the task's as for the other methods. DecodeROnto's errors name the blob; so do these.
    ASSIGN_OR_RETURN(common::Adapter update,
                     common::DecodeROnto(bytes, origin, *frozen_, std::move(reuse)));
    if (absl::Status st = common::CheckShapes(update, shapes_, origin, Scaling(rank)); !st.ok())
      return absl::InvalidArgumentError(StrCat(origin, ": ", st.message()));
    return update;
  }
  ASSIGN_OR_RETURN(common::Adapter update, common::DecodeAdapter(bytes, origin, std::move(reuse)));
  std::vector<common::ModuleShape> shapes = shapes_;
  if (rank > 0)
    for (common::ModuleShape& s : shapes) s.rank = rank;
  RETURN_IF_ERROR(common::CheckShapes(update, shapes, origin, Scaling(rank)));
  return update;
}

Verdict UpdateGate::Check(const Sender& sender, const v1::UploadRequest& request,
                          const std::string& part, CheckedUpdate* checked) const {
  const std::string origin =
      sketch_
          ? StrCat(sender.client, "'s answer to initialisation step ", request.sketch_step() + 1)
          : StrCat("update of ", sender.client, " for round ", request.round());
  double norm = 0;
  absl::Status status = VerifyPart(*store_, part, request.sha256(), origin, [&](auto bytes) {
    if (masked_bytes_) {  // the masked sum of what it holds is all anyone learns
      if (static_cast<int64_t>(bytes.size()) == *masked_bytes_) return absl::OkStatus();
      return absl::InvalidArgumentError(StrCat(origin, ": a masked input of ", bytes.size(),
                                               " bytes; the round's are ", *masked_bytes_));
    }
    if (sketch_) return common::DecodeMatrices(bytes, origin, *sketch_).status();
    absl::StatusOr<common::Adapter> update = Decode(bytes, origin, sender.rank);
    if (update.ok()) {
      for (size_t i = 0; i < update->num_modules(); ++i) norm += std::pow(update->DeltaNorm(i), 2);
      norm = std::sqrt(norm);
    }
    return update.status();
  });
  // The store's failure, not the client's: UNAVAILABLE, retried.
  if (absl::IsUnavailable(status)) return Verdict::Refused(ErrorDetail::RETRY_LATER, status);
  std::string_view kind = "invalid";  // undecodable, other shapes or scaling, non-finite
  const int64_t claimed = request.num_examples() > 0 ? request.num_examples() : sender.joined;
  if (status.ok() && claimed > sender.joined) {
    kind = "examples";
    status = absl::InvalidArgumentError(StrCat("the update claims ", claimed,
                                               " examples, more than the ", sender.joined, " ",
                                               sender.client, " joined with"));
  }
  if (status.ok() && options_->max_update_norm > 0 && norm > options_->max_update_norm) {
    kind = "norm";
    status = absl::InvalidArgumentError(StrCat("the update's norm ‖s·B·A‖_F = ", norm,
                                               " exceeds the run's bound of ",
                                               options_->max_update_norm, " (--max-update-norm)"));
  }
  if (!status.ok()) return Verdict::Refused(ErrorDetail::REJECTED, status, kind);
  // Its weight: what it trained on, within the round's cap (floored, so the cap's share bound
  // holds). Compared as doubles, converted only when the cap is the smaller: a claim near
  // INT64_MAX is 2^63 as a double, which no int64 holds (found by the fuzzer).
  const double cap = std::floor(weight_cap_);
  checked->weight = std::max<int64_t>(
      1, cap < static_cast<double>(claimed) ? static_cast<int64_t>(cap) : claimed);
  checked->norm = norm;
  return Verdict::Admitted();
}

namespace {
std::string_view View(const common::MappedFile& file) {
  return {reinterpret_cast<const char*>(file.bytes().data()), file.bytes().size()};
}
}  // namespace

absl::StatusOr<common::Adapter> UpdateGate::Update(const AcceptedUpdate& u,
                                                   common::Adapter reuse) const {
  ASSIGN_OR_RETURN(const common::MappedFile blob, store_->MapBlob(u.sha256));
  const auto rank = options_->client_ranks.find(u.client);
  return Decode(View(blob), StrCat("the accepted update of ", u.client),
                rank == options_->client_ranks.end() ? 0 : rank->second, std::move(reuse));
}

absl::StatusOr<std::vector<common::MatrixD>> UpdateGate::Products(const AcceptedUpdate& u) const {
  ASSIGN_OR_RETURN(const common::MappedFile blob, store_->MapBlob(u.sha256));
  return common::DecodeMatrices(View(blob), StrCat("the accepted answer of ", u.client), *sketch_);
}

absl::Status VerifyPart(const StateStore& store, const std::string& part, const std::string& sha256,
                        const std::string& origin,
                        const std::function<absl::Status(std::string_view bytes)>& decode) {
  absl::StatusOr<common::MappedFile> mapped_or = store.MapPart(part);
  if (!mapped_or.ok()) return store.Unavailable(origin, mapped_or.status());
  const common::MappedFile& mapped = *mapped_or;
  const std::string_view bytes(reinterpret_cast<const char*>(mapped.bytes().data()),
                               mapped.bytes().size());
  auto hashed = std::async(std::launch::async, [&]() -> absl::StatusOr<std::string> {
    std::string sha = common::Sha256Hex(bytes);
    if (absl::Status st = store.SyncPart(part); !st.ok()) return store.Unavailable(origin, st);
    return sha;
  });
  const absl::Status decoded = decode(bytes);
  ASSIGN_OR_RETURN(const std::string sha, hashed.get());
  if (sha != sha256) {
    return absl::InvalidArgumentError(StrCat("checksum mismatch: the update's sha256 is ", sha,
                                             " but the upload announced ", sha256));
  }
  return decoded;
}

}  // namespace fedlora::server
