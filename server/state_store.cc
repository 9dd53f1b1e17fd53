#include "server/state_store.h"

#include <fcntl.h>
#include <unistd.h>

#include <cstring>
#include <fstream>

#include "common/blob.h"
#include "common/file_util.h"
#include "common/status_macros.h"
#include "common/strings.h"

namespace fedlora::server {
namespace fs = std::filesystem;
using common::StrCat;

namespace {

nlohmann::json ToJson(const Ledger& l) {
  nlohmann::json versions = nlohmann::json::array();
  for (const Version& v : l.versions) {
    nlohmann::json blobs = nlohmann::json::array();
    for (const BlobInfo& b : v.blobs) {
      blobs.push_back(
          {{"sha256", b.sha256}, {"size", b.size}, {"kind", b.kind}, {"version", b.version}});
    }
    versions.push_back({{"version", v.version}, {"blobs", blobs}});
  }
  return {{"format", "fedlora-ledger-1"}, {"run_id", l.run_id},
          {"method", l.method},           {"base_model_sha256", l.base_model_sha256},
          {"modules", l.modules},         {"versions", versions},
          {"client_dp", l.client_dp}};
}

absl::StatusOr<Ledger> FromJson(const nlohmann::json& j, const std::string& origin) {
  try {
    if (j.at("format") != "fedlora-ledger-1") {
      return absl::FailedPreconditionError(
          StrCat(origin, ": unknown ledger format ", j.at("format").dump()));
    }
    Ledger l;
    l.run_id = j.at("run_id").get<std::string>();
    l.method = j.at("method").get<std::string>();
    l.base_model_sha256 = j.at("base_model_sha256").get<std::string>();
    l.modules = j.at("modules");
    l.client_dp = j.value("client_dp", nlohmann::json::object());
    for (const auto& v : j.at("versions")) {
      Version version{v.at("version").get<int64_t>(), {}};
      for (const auto& b : v.at("blobs")) {
        version.blobs.push_back({b.at("sha256").get<std::string>(), b.at("size").get<int64_t>(),
                                 b.at("kind").get<std::string>(), b.at("version").get<int64_t>()});
      }
      l.versions.push_back(std::move(version));
    }
    return l;
  } catch (const nlohmann::json::exception& e) {
    return absl::DataLossError(StrCat(origin, ": the ledger is damaged: ", e.what()));
  }
}

}  // namespace

absl::StatusOr<StateStore> StateStore::Open(const fs::path& dir) {
  std::error_code ec;
  fs::create_directories(dir / "blobs", ec);
  fs::remove_all(dir / "incoming",
                 ec);  // partial uploads of a previous process: the round is redone
  fs::create_directories(dir / "incoming", ec);
  if (ec)
    return absl::FailedPreconditionError(
        StrCat("cannot create state directory ", dir.string(), ": ", ec.message()));
  StateStore store;
  store.dir_ = dir;
  const fs::path ledger = dir / "ledger.json";
  if (fs::exists(ledger)) {
    ASSIGN_OR_RETURN(std::string text, common::ReadFileToString(ledger));
    nlohmann::json j = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return absl::DataLossError(StrCat(ledger.string(), " is not valid JSON"));
    ASSIGN_OR_RETURN(store.ledger_, FromJson(j, ledger.string()));
    store.has_ledger_ = true;
    if (fs::exists(dir / "metrics.jsonl")) {
      ASSIGN_OR_RETURN(std::string metrics, common::ReadFileToString(dir / "metrics.jsonl"));
      for (size_t start = 0, end; (end = metrics.find('\n', start)) != std::string::npos;
           start = end + 1) {
        store.metrics_.push_back(metrics.substr(start, end - start));
      }
    }
    for (const Version& v : store.ledger_.versions) {
      for (const BlobInfo& b : v.blobs) {
        if (!fs::exists(dir / "blobs" / b.sha256)) {
          return absl::DataLossError(StrCat(ledger.string(), " names blob ", b.sha256, " (version ",
                                            v.version, ") but blobs/ does not hold it"));
        }
      }
    }
  }
  return store;
}

absl::StatusOr<std::string> StateStore::PutBlob(std::string_view bytes) {
  const std::string sha = common::Sha256Hex(bytes);
  const fs::path path = dir_ / "blobs" / sha;
  if (!fs::exists(path)) RETURN_IF_ERROR(common::WriteFileAtomically(path, bytes));
  return sha;
}

absl::StatusOr<std::pair<std::string, int64_t>> StateStore::ReadBlob(const std::string& sha256,
                                                                     int64_t offset,
                                                                     int64_t max_bytes) const {
  if (!common::IsSha256Hex(sha256))
    return absl::InvalidArgumentError(StrCat("'", sha256, "' is not a sha256 (64 hex digits)"));
  const fs::path path = dir_ / "blobs" / sha256;
  std::error_code ec;
  const auto size = fs::file_size(path, ec);
  if (ec) return absl::NotFoundError(StrCat("no blob ", sha256));
  const int64_t total = static_cast<int64_t>(size);
  if (offset < 0 || offset > total) {
    return absl::OutOfRangeError(
        StrCat("offset ", offset, " is outside blob ", sha256, " of ", total, " bytes"));
  }
  const int64_t n = std::min<int64_t>(max_bytes, total - offset);
  std::string data(static_cast<size_t>(n), '\0');
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return absl::InternalError(StrCat("cannot open blob ", sha256, ": ", std::strerror(errno)));
  const ssize_t got = ::pread(fd, data.data(), static_cast<size_t>(n), offset);
  ::close(fd);
  if (got != n) return absl::InternalError(StrCat("cannot read blob ", sha256));
  return std::make_pair(std::move(data), total);
}

absl::StatusOr<std::string> StateStore::ReadWholeBlob(const std::string& sha256) const {
  ASSIGN_OR_RETURN(auto chunk, ReadBlob(sha256, 0, INT64_MAX));
  return std::move(chunk.first);
}

absl::Status StateStore::WritePart(const std::string& name, int64_t offset, std::string_view data) {
  const fs::path path = dir_ / "incoming" / name;
  int fd = ::open(path.c_str(), O_WRONLY | O_CLOEXEC);
  if (fd < 0)
    return absl::InternalError(StrCat("cannot open ", path.string(), ": ", std::strerror(errno)));
  const ssize_t n = ::pwrite(fd, data.data(), data.size(), offset);
  ::close(fd);
  if (n != static_cast<ssize_t>(data.size())) {
    return absl::InternalError(StrCat("cannot write ", path.string(), ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status StateStore::StartPart(const std::string& name) {
  const fs::path path = dir_ / "incoming" / name;
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0)
    return absl::InternalError(StrCat("cannot create ", path.string(), ": ", std::strerror(errno)));
  ::close(fd);
  return absl::OkStatus();
}

absl::StatusOr<common::MappedFile> StateStore::MapPart(const std::string& name) const {
  return common::MappedFile::Open(dir_ / "incoming" / name);
}

absl::Status StateStore::SyncPart(const std::string& name) const {
  return common::SyncPath(dir_ / "incoming" / name);
}

absl::Status StateStore::AdoptPart(const std::string& name, const std::string& sha256) {
  const fs::path part = dir_ / "incoming" / name, blob = dir_ / "blobs" / sha256;
  if (::rename(part.c_str(), blob.c_str()) != 0) {
    return absl::InternalError(
        StrCat("cannot move ", part.string(), " to ", blob.string(), ": ", std::strerror(errno)));
  }
  return common::SyncPath(dir_ / "blobs");
}

void StateStore::DropPart(const std::string& name) {
  std::error_code ec;
  fs::remove(dir_ / "incoming" / name, ec);
}

absl::Status StateStore::SaveLedger(const Ledger& ledger) {
  RETURN_IF_ERROR(common::WriteFileAtomically(dir_ / "ledger.json", ToJson(ledger).dump(2) + "\n"));
  ledger_ = ledger;
  has_ledger_ = true;
  return absl::OkStatus();
}

absl::Status StateStore::AppendMetrics(const nlohmann::json& line) {
  std::vector<std::string> lines = metrics_;
  lines.push_back(line.dump());
  std::string text;
  for (const std::string& l : lines) text += l + "\n";
  RETURN_IF_ERROR(common::WriteFileAtomically(dir_ / "metrics.jsonl", text));
  metrics_ = std::move(lines);
  return absl::OkStatus();
}

}  // namespace fedlora::server
