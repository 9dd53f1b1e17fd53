#include "client/workloads/command_workload.h"

#include <spdlog/spdlog.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "common/aggregation/aggregate.h"
#include "common/base/file_util.h"
#include "common/base/status_macros.h"
#include "common/base/strings.h"
#include "common/base/subprocess.h"
#include "common/net/wire.h"
#include "common/tensor/peft.h"

namespace fedlora::client {
namespace fs = std::filesystem;
using common::StrCat;

absl::StatusOr<std::vector<v1::ModuleSpec>> ParseModuleList(const std::string& text) {
  std::vector<v1::ModuleSpec> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    const size_t a = item.find(':'), b = item.find(':', a == std::string::npos ? a : a + 1);
    v1::ModuleSpec spec;
    try {
      if (a == std::string::npos || b == std::string::npos) throw std::invalid_argument(item);
      spec.set_name(item.substr(0, a));
      spec.set_in_features(std::stoi(item.substr(a + 1, b - a - 1)));
      spec.set_out_features(std::stoi(item.substr(b + 1)));
    } catch (const std::exception&) {
      return absl::InvalidArgumentError(
          StrCat("module '", item, "' is not name:in_features:out_features"));
    }
    if (spec.in_features() <= 0 || spec.out_features() <= 0) {
      return absl::InvalidArgumentError(StrCat("module '", item, "' needs positive sizes"));
    }
    out.push_back(std::move(spec));
  }
  if (out.empty())
    return absl::InvalidArgumentError(
        "no modules given (expected name:in_features:out_features,...)");
  return out;
}

absl::StatusOr<v1::TrainMetrics> CommandWorkload::Train(const v1::Task& task,
                                                        common::Adapter& adapter) {
  const fs::path dir = options_.work_dir / StrCat("round-", task.round());
  std::error_code ec;
  fs::remove_all(dir, ec);
  fs::create_directories(dir, ec);
  RETURN_IF_ERROR(common::WritePeftAdapter(adapter, dir / "start", {common::DType::kF32, true}));
  const v1::TrainSettings& s = task.settings();
  nlohmann::json modules = nlohmann::json::array();
  for (const auto& m : task.modules()) {
    modules.push_back(
        {{"name", m.name()}, {"in_features", m.in_features()}, {"out_features", m.out_features()}});
  }
  const nlohmann::json json = {{"round", task.round()},
                               {"method", common::MethodNameOf(task.method())},
                               {"rank", s.rank()},
                               {"lora_alpha", s.lora_alpha()},
                               {"local_steps", s.local_steps()},
                               {"learning_rate", s.learning_rate()},
                               {"seed", s.seed()},
                               {"modules", modules},
                               {"deltas", deltas_}};
  RETURN_IF_ERROR(common::WriteFileAtomically(dir / "task.json", json.dump(2) + "\n"));
  const fs::path out = dir / "out";
  fs::create_directories(out, ec);
  // The command is one argument of the shell; the paths travel in the environment, never inside
  // the command's text, so any character in them is safe.
  common::SubprocessOptions run;
  run.environment = {{"FEDLORA_START_DIR", (dir / "start").string()},
                     {"FEDLORA_OUT_DIR", out.string()},
                     {"FEDLORA_TASK_JSON", (dir / "task.json").string()}};
  spdlog::info("round {}: running the training command", task.round());
  ASSIGN_OR_RETURN(const common::ExitStatus exit,
                   common::RunSubprocess({"/bin/sh", "-c", options_.command}, run));
  if (!exit.ok())
    return absl::InternalError(
        StrCat("the training command failed (", exit.ToString(), "): ", options_.command));
  // What the command wrote is read without following links (file_util.h, Symlinks).
  ASSIGN_OR_RETURN(common::Adapter trained,
                   common::ReadPeftAdapter(out, common::Symlinks::kRefuse));
  // The task's modules, shapes and lora_R, nothing more (the scaling is the program's: folded
  // below).
  const std::vector<common::ModuleShape> asked(adapter.modules().begin(), adapter.modules().end());
  RETURN_IF_ERROR(common::CheckShapes(trained, asked,
                                      StrCat("the training command's adapter in ", out.string())));
  for (size_t i = 0; i < adapter.num_modules(); ++i) {
    const auto& want = adapter.module(i);
    const size_t j = *trained.FindModule(want.name);
    // Keep our scaling: fold the program's (it may have written another lora_alpha) into B, or into
    // R.
    const float ratio = static_cast<float>(trained.module(j).scaling / want.scaling);
    if (want.has_r) {
      adapter.R(i) = trained.R(j) * ratio;
    } else {
      adapter.A(i) = trained.A(j);
      adapter.B(i) = trained.B(j) * ratio;
    }
  }
  const fs::path metrics_file = out / "metrics.json";
  auto text = common::ReadFileToString(metrics_file, common::Symlinks::kRefuse);
  if (!text.ok()) {
    return absl::InvalidArgumentError(
        absl::IsNotFound(text.status())
            ? StrCat("the training command wrote no ", metrics_file.string())
            : std::string(text.status().message()));
  }
  const nlohmann::json metrics = nlohmann::json::parse(*text, nullptr, false);
  auto bad = [&](std::string_view what) {
    return absl::InvalidArgumentError(
        StrCat(metrics_file.string(), ": ", what,
               " (expected {\"loss_before\": number, \"loss_after\": number[, \"num_examples\": "
               "positive integer]}; it holds: ",
               text->substr(0, 200), ")"));
  };
  if (!metrics.is_object()) return bad("not a JSON object");
  for (const char* key : {"loss_before", "loss_after"}) {
    if (!metrics.contains(key) || !metrics[key].is_number())
      return bad(StrCat("\"", key, "\" is missing or not a number"));
  }
  if (metrics.contains("num_examples")) {
    if (!metrics["num_examples"].is_number_integer() || metrics["num_examples"].get<int64_t>() <= 0)
      return bad("\"num_examples\" is not a positive integer");
    examples_ = metrics["num_examples"].get<int64_t>();  // this round's weight
  }
  v1::TrainMetrics result;
  result.set_loss_before(metrics["loss_before"].get<double>());
  result.set_loss_after(metrics["loss_after"].get<double>());
  result.set_steps(s.local_steps());
  return result;
}

absl::Status CommandWorkload::MergeIntoBase(const common::Adapter& delta) {
  // The program owns the base: keep the delta where the next task.json names it.
  const fs::path dir = options_.work_dir / "deltas" / StrCat(deltas_.size() + 1);
  RETURN_IF_ERROR(common::WritePeftAdapter(delta, dir, {common::DType::kF32, true}));
  deltas_.push_back(fs::absolute(dir).string());
  return absl::OkStatus();
}

absl::Status CommandWorkload::WriteFinalState(const fs::path& dir) const {
  const nlohmann::json json = {{"deltas", deltas_}};
  return common::WriteFileAtomically(dir / "deltas.json", json.dump(2) + "\n");
}

}  // namespace fedlora::client
