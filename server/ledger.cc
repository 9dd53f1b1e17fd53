#include "server/ledger.h"

#include "common/aggregation/sketch.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::server {
namespace {

using common::StrCat;
using nlohmann::json;

constexpr BlobKind kBlobKinds[] = {BlobKind::kAdapter, BlobKind::kDelta, BlobKind::kFrozen,
                                   BlobKind::kR, BlobKind::kBasis};

json BlobToJson(const BlobRef& b) {
  return {{"sha256", b.sha256},
          {"size", b.size},
          {"kind", BlobKindName(b.kind)},
          {"version", b.version}};
}
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
    case BlobKind::kBasis:
      return "basis";
  }
  return "?";
}

int FedSbInit::total_steps() const {
  return mode == "dense" ? 1 : common::SketchSteps(power_iterations);
}

bool Ledger::HoldsBlob(std::string_view sha256) const {
  if (init) {
    for (const FedSbInit::Step& s : init->steps) {
      if (s.basis.sha256 == sha256) return true;
    }
  }
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
    for (const BlobRef& b : v.blobs) blobs.push_back(BlobToJson(b));
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
  if (l.init) {
    json steps = json::array();
    for (const FedSbInit::Step& s : l.init->steps)
      steps.push_back({{"basis", BlobToJson(s.basis)}, {"record", s.record}});
    out["fed_sb_init"] = {{"mode", l.init->mode},
                          {"columns", l.init->columns},
                          {"power_iterations", l.init->power_iterations},
                          {"examples", l.init->examples},
                          {"lr", l.init->lr},
                          {"seed", l.init->seed},
                          {"steps", steps}};
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
    auto blob_from_json = [&](const json& b) -> absl::StatusOr<BlobRef> {
      const std::string kind = b.at("kind").get<std::string>();
      const auto* k = std::find_if(std::begin(kBlobKinds), std::end(kBlobKinds),
                                   [&](BlobKind x) { return BlobKindName(x) == kind; });
      if (k == std::end(kBlobKinds)) return damaged(StrCat("unknown blob kind '", kind, "'"));
      return BlobRef{b.at("sha256").get<std::string>(), b.at("size").get<int64_t>(), *k,
                     b.at("version").get<int64_t>()};
    };
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
        ASSIGN_OR_RETURN(BlobRef blob, blob_from_json(b));
        version.blobs.push_back(std::move(blob));
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
    if (j.contains("fed_sb_init")) {
      const json& i = j["fed_sb_init"];
      FedSbInit init{i.at("mode").get<std::string>(),
                     i.at("columns").get<int>(),
                     i.at("power_iterations").get<int>(),
                     i.at("examples").get<int>(),
                     i.at("lr").get<double>(),
                     i.at("seed").get<uint64_t>(),
                     {}};
      if (init.mode != "sketch" && init.mode != "dense")
        return damaged(StrCat("unknown fed_sb_init mode '", init.mode, "'"));
      for (const json& s : i.at("steps")) {
        ASSIGN_OR_RETURN(BlobRef basis, blob_from_json(s.at("basis")));
        init.steps.push_back({std::move(basis), s.value("record", json())});
      }
      if (static_cast<int>(init.steps.size()) >= init.total_steps())
        return damaged(StrCat(init.steps.size(), " initialisation steps of ", init.total_steps()));
      l.init = std::move(init);
    }
    return l;
  } catch (const json::exception& e) {
    return damaged(e.what());
  }
}

}  // namespace fedlora::server
