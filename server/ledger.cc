#include "server/ledger.h"

#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::server {
namespace {

using common::StrCat;
using nlohmann::json;

constexpr BlobKind kBlobKinds[] = {BlobKind::kAdapter, BlobKind::kDelta, BlobKind::kFrozen,
                                   BlobKind::kR};
constexpr std::string_view kFormat = "fedlora-ledger-1";

}  // namespace

std::string_view BlobKindName(BlobKind kind) {
  switch (kind) {
    case BlobKind::kAdapter:
      return "adapter";
    case BlobKind::kDelta:
      return "delta";
    case BlobKind::kFrozen:
      return "frozen";
    case BlobKind::kR:
      return "r";
  }
  return "?";
}

bool Ledger::HoldsBlob(std::string_view sha256) const {
  for (const Version& v : versions) {
    for (const BlobRef& b : v.blobs) {
      if (b.sha256 == sha256) return true;
    }
  }
  return false;
}

std::vector<common::ModuleShape> Ledger::Shapes(int rank, bool has_r) const {
  std::vector<common::ModuleShape> shapes;
  for (const ModuleSpec& m : modules)
    shapes.push_back({m.name, rank, m.in_features, m.out_features, 1.0, has_r});
  return shapes;
}

json LedgerToJson(const Ledger& l) {
  json versions = json::array();
  for (const Version& v : l.versions) {
    json blobs = json::array();
    for (const BlobRef& b : v.blobs) {
      blobs.push_back({{"sha256", b.sha256},
                       {"size", b.size},
                       {"kind", BlobKindName(b.kind)},
                       {"version", b.version}});
    }
    json entry = {{"version", v.version}, {"blobs", blobs}};
    if (!v.record.is_null()) entry["record"] = v.record;
    versions.push_back(std::move(entry));
  }
  json modules = json::array();
  for (const ModuleSpec& m : l.modules) {
    modules.push_back(
        {{"name", m.name}, {"in_features", m.in_features}, {"out_features", m.out_features}});
  }
  json out = {{"format", kFormat},
              {"run_id", l.run_id},
              {"method", common::MethodName(l.method)},
              {"base_model_sha256", l.base_model_sha256},
              {"modules", modules},
              {"versions", versions}};
  if (l.client_dp) {
    out["client_dp"] = {{"clip", l.client_dp->clip},
                        {"rounds", common::PrivacyHistoryToJson(l.client_dp->rounds)}};
  }
  return out;
}

absl::StatusOr<Ledger> LedgerFromJson(const json& j, std::string_view origin) {
  auto damaged = [&](const auto& what) {
    return absl::DataLossError(StrCat(origin, ": the ledger is damaged: ", what));
  };
  try {
    if (!j.is_object() || j.value("format", "") != kFormat) {
      return damaged(StrCat("expected \"format\": \"", kFormat, "\", found ",
                            j.is_object() && j.contains("format") ? j["format"].dump() : "none"));
    }
    Ledger l;
    l.run_id = j.at("run_id").get<std::string>();
    absl::StatusOr<common::Method> method = common::ParseMethod(j.at("method").get<std::string>());
    if (!method.ok()) return damaged(method.status().message());
    l.method = *method;
    l.base_model_sha256 = j.at("base_model_sha256").get<std::string>();
    for (const json& m : j.at("modules")) {
      l.modules.push_back({m.at("name").get<std::string>(), m.at("in_features").get<int>(),
                           m.at("out_features").get<int>()});
    }
    for (const json& v : j.at("versions")) {
      Version version{v.at("version").get<int64_t>(), {}, v.value("record", json())};
      if (version.version != static_cast<int64_t>(l.versions.size())) {
        return damaged(StrCat("version ", version.version, " stands at position ",
                              l.versions.size(), "; versions must be 0, 1, 2, ... in order"));
      }
      for (const json& b : v.at("blobs")) {
        const std::string kind = b.at("kind").get<std::string>();
        const auto* k = std::find_if(std::begin(kBlobKinds), std::end(kBlobKinds),
                                     [&](BlobKind x) { return BlobKindName(x) == kind; });
        if (k == std::end(kBlobKinds)) return damaged(StrCat("unknown blob kind '", kind, "'"));
        version.blobs.push_back({b.at("sha256").get<std::string>(), b.at("size").get<int64_t>(), *k,
                                 b.at("version").get<int64_t>()});
      }
      l.versions.push_back(std::move(version));
    }
    if (j.contains("client_dp") && j["client_dp"].contains("rounds")) {
      const json& dp = j["client_dp"];
      absl::StatusOr<common::PrivacyHistory> rounds =
          common::PrivacyHistoryFromJson(dp.at("rounds"), "client_dp");
      if (!rounds.ok()) return damaged(rounds.status().message());
      l.client_dp = ClientDpState{dp.at("clip").get<double>(), *std::move(rounds)};
    }
    return l;
  } catch (const json::exception& e) {
    return damaged(e.what());
  }
}

}  // namespace fedlora::server
