#include "common/run/ledger.h"

#include <algorithm>

#include "common/aggregation/sketch.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"

namespace fedlora::common {
namespace {

using nlohmann::json;

constexpr std::string_view kFormat = "fedlora-ledger-1";
constexpr BlobKind kBlobKinds[] = {BlobKind::kAdapter, BlobKind::kDelta, BlobKind::kFrozen,
                                   BlobKind::kR, BlobKind::kBasis};

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

absl::StatusOr<BlobKind> ParseBlobKind(std::string_view name) {
  for (BlobKind k : kBlobKinds)
    if (BlobKindName(k) == name) return k;
  return absl::InvalidArgumentError(
      StrCat("unknown blob kind '", name, "'; expected adapter, delta, frozen, r or basis"));
}

std::optional<BlobKind> VersionBlobKind(Method method, int64_t version) {
  switch (method) {
    case Method::kFlora:
      if (version == 0) return std::nullopt;
      return BlobKind::kDelta;
    case Method::kFedSb:
      return version == 0 ? BlobKind::kFrozen : BlobKind::kR;
    case Method::kFedIt:
    case Method::kLoraFair:
      break;
  }
  return BlobKind::kAdapter;
}

json BlobRef::ToJson() const {
  return {{"sha256", sha256}, {"size", size}, {"kind", BlobKindName(kind)}, {"version", version}};
}

absl::StatusOr<BlobRef> BlobRef::FromJson(JsonReader& in) {
  BlobRef b;
  std::string kind;
  in.Get("sha256", &b.sha256).Get("size", &b.size).Get("kind", &kind).Get("version", &b.version);
  if (!in.ok()) return b;
  if (absl::StatusOr<BlobKind> k = ParseBlobKind(kind); k.ok())
    b.kind = *k;
  else
    in.Fail("kind", std::string(k.status().message()));
  if (!IsSha256Hex(b.sha256)) in.Fail("sha256", "not 64 lower-case hex digits");
  return b;
}

json ModuleSpec::ToJson() const {
  return {{"name", name}, {"in_features", in_features}, {"out_features", out_features}};
}

absl::StatusOr<ModuleSpec> ModuleSpec::FromJson(JsonReader& in) {
  ModuleSpec m;
  in.Get("name", &m.name).Get("in_features", &m.in_features).Get("out_features", &m.out_features);
  if (in.ok() && (m.in_features < 1 || m.out_features < 1))
    in.Fail("in_features", StrCat("module ", m.name, " of ", m.out_features, "x", m.in_features));
  return m;
}

json Version::ToJson() const {
  json blob_list = json::array();
  for (const BlobRef& b : blobs) blob_list.push_back(b.ToJson());
  json j = {{"version", version}, {"blobs", blob_list}};
  if (record) j["record"] = record->ToJson();
  if (init_record) j["record"] = init_record->ToJson();
  return j;
}

absl::StatusOr<Version> Version::FromJson(JsonReader& in) {
  Version v;
  in.Get("version", &v.version).Get("blobs", &v.blobs);
  // Version 0's record, when it has one, is the last step of Fed-SB's initialisation.
  if (v.version == 0)
    in.Maybe("record", &v.init_record);
  else
    in.Get("record", &v.record);
  if (in.ok() && v.record && v.record->round != v.version)
    in.Fail("record", StrCat("the record of round ", v.record->round, " on version ", v.version));
  return v;
}

int FedSbInit::total_steps() const {
  return mode == Mode::kDense ? 1 : SketchSteps(power_iterations);
}

json FedSbInit::Step::ToJson() const {
  return {{"basis", basis.ToJson()}, {"record", record.ToJson()}};
}

absl::StatusOr<FedSbInit::Step> FedSbInit::Step::FromJson(JsonReader& in) {
  Step s;
  in.Get("basis", &s.basis).Get("record", &s.record);
  return s;
}

json FedSbInit::ToJson() const {
  json step_list = json::array();
  for (const Step& s : steps) step_list.push_back(s.ToJson());
  return {{"mode", mode == Mode::kDense ? "dense" : "sketch"},
          {"columns", columns},
          {"power_iterations", power_iterations},
          {"examples", examples},
          {"lr", lr},
          {"seed", seed},
          {"steps", step_list}};
}

absl::StatusOr<FedSbInit> FedSbInit::FromJson(JsonReader& in) {
  FedSbInit init;
  std::string mode;
  in.Get("mode", &mode)
      .Get("columns", &init.columns)
      .Get("power_iterations", &init.power_iterations)
      .Get("examples", &init.examples)
      .Get("lr", &init.lr)
      .Get("seed", &init.seed)
      .Get("steps", &init.steps);
  if (!in.ok()) return init;
  if (mode != "sketch" && mode != "dense")
    in.Fail("mode", StrCat("unknown mode '", mode, "'; expected sketch or dense"));
  init.mode = mode == "dense" ? Mode::kDense : Mode::kSketch;
  if (init.power_iterations < 0 || init.power_iterations > 100)
    in.Fail("power_iterations", StrCat(init.power_iterations, " is outside [0, 100]"));
  else if (static_cast<int>(init.steps.size()) >= init.total_steps())
    in.Fail("steps", StrCat(init.steps.size(), " steps of ", init.total_steps()));
  return init;
}

json ClientDpState::ToJson() const {
  return {{"clip", clip}, {"rounds", PrivacyHistoryToJson(rounds)}};
}

absl::StatusOr<ClientDpState> ClientDpState::FromJson(JsonReader& in) {
  ClientDpState s;
  json history;
  in.Get("clip", &s.clip).Get("rounds", &history);
  if (!in.ok()) return s;
  if (absl::StatusOr<PrivacyHistory> h = PrivacyHistoryFromJson(history, "client_dp"); h.ok())
    s.rounds = *std::move(h);
  else
    in.Fail("rounds", std::string(h.status().message()));
  return s;
}

bool Ledger::HoldsBlob(std::string_view sha256) const {
  if (init) {
    for (const FedSbInit::Step& s : init->steps)
      if (s.basis.sha256 == sha256) return true;
  }
  for (const Version& v : versions) {
    for (const BlobRef& b : v.blobs)
      if (b.sha256 == sha256) return true;
  }
  return false;
}

std::vector<ModuleShape> Ledger::Shapes(int rank, bool has_r) const {
  std::vector<ModuleShape> shapes;
  for (const ModuleSpec& m : modules)
    shapes.push_back({m.name, rank, m.in_features, m.out_features, 1.0, has_r});
  return shapes;
}

json Ledger::ToJson() const {
  json version_list = json::array(), module_list = json::array();
  for (const Version& v : versions) version_list.push_back(v.ToJson());
  for (const ModuleSpec& m : modules) module_list.push_back(m.ToJson());
  json out = {{"format", kFormat},
              {"run_id", run_id},
              {"method", MethodName(method)},
              {"base_model_sha256", base_model_sha256},
              {"modules", module_list},
              {"versions", version_list}};
  if (client_dp) out["client_dp"] = client_dp->ToJson();
  if (init) out["fed_sb_init"] = init->ToJson();
  return out;
}

absl::StatusOr<Ledger> Ledger::FromJson(JsonReader& in) {
  Ledger l;
  std::string format, method;
  in.Get("format", &format);
  if (in.ok() && format != kFormat) in.Fail("format", StrCat("expected \"", kFormat, "\""));
  in.Get("run_id", &l.run_id)
      .Get("method", &method)
      .Get("base_model_sha256", &l.base_model_sha256)
      .Get("modules", &l.modules)
      .Get("versions", &l.versions)
      .Maybe("fed_sb_init", &l.init);
  if (!in.ok()) return l;
  if (absl::StatusOr<Method> m = ParseMethod(method); m.ok())
    l.method = *m;
  else
    in.Fail("method", std::string(m.status().message()));
  if (in.ok() && l.versions.empty() && !(l.method == Method::kFedSb && l.init))
    in.Fail("versions", "none; only a fed-sb run still in its initialisation has no version 0");
  for (size_t i = 0; i < l.versions.size(); ++i) {
    const Version& v = l.versions[i];
    if (v.version != static_cast<int64_t>(i)) {
      in.Fail(StrCat("versions/", i), StrCat("version ", v.version, " stands at position ", i,
                                             "; versions must be 0, 1, 2, ... in order"));
      continue;
    }
    const std::optional<BlobKind> want = VersionBlobKind(l.method, v.version);
    if (v.blobs.size() != (want ? 1u : 0u)) {
      in.Fail(StrCat("versions/", i, "/blobs"),
              StrCat(v.blobs.size(), " blobs; version ", v.version, " of a ", MethodName(l.method),
                     " run holds ", want ? "exactly one" : "none"));
    } else if (want && v.blobs[0].kind != *want) {
      in.Fail(StrCat("versions/", i, "/blobs/0/kind"),
              StrCat(BlobKindName(v.blobs[0].kind), "; version ", v.version, " of a ",
                     MethodName(l.method), " run holds a blob of kind ", BlobKindName(*want)));
    }
  }
  if (l.init) {
    for (size_t i = 0; i < l.init->steps.size(); ++i) {
      if (l.init->steps[i].basis.kind != BlobKind::kBasis)
        in.Fail(StrCat("fed_sb_init/steps/", i, "/basis/kind"), "expected basis");
    }
  }
  in.Maybe("client_dp", &l.client_dp);
  return l;
}

absl::StatusOr<Ledger> ReadLedger(const std::filesystem::path& file) {
  ASSIGN_OR_RETURN(const std::string text, ReadFileToString(file, Symlinks::kRefuse));
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {  // says where, which the non-throwing parse does not
    const size_t at = std::min<size_t>(e.byte, text.size());
    const auto line = 1 + std::count(text.begin(), text.begin() + static_cast<ptrdiff_t>(at), '\n');
    return absl::DataLossError(
        StrCat(file.string(), " line ", line, ": not valid JSON (byte ", e.byte, ")"));
  }
  return JsonReader::Parse<Ledger>(j, file.string());
}

}  // namespace fedlora::common
