#include "common/net/grpc_log.h"

#include <grpc/support/log.h>
#include <spdlog/spdlog.h>

#include <mutex>
#include <string_view>

#include "common/base/log_limiter.h"

namespace fedlora::common {
namespace {

struct GrpcLog {
  std::mutex mu;
  LogLimiter limiter;
  std::function<void()> on_handshake_failure;
};

GrpcLog& State() {
  static GrpcLog* log = new GrpcLog();  // gRPC may log while the process exits: never destroyed
  return *log;
}

void Log(gpr_log_func_args* args) {
  GrpcLog& log = State();
  const std::string_view message = args->message;
  const bool handshake = message.find("Handshake failed") != std::string_view::npos;
  std::string_view file = args->file;
  file = file.substr(file.rfind('/') + 1);
  std::string repeated;
  {
    std::lock_guard lock(log.mu);
    if (handshake && log.on_handshake_failure) log.on_handshake_failure();
    if (!log.limiter.Allow(StrCat(file, ":", args->line), LogLimiter::Clock::now(), &repeated))
      return;
  }
  const spdlog::level::level_enum level =
      handshake                                  ? spdlog::level::warn
      : args->severity == GPR_LOG_SEVERITY_ERROR ? spdlog::level::err
      : args->severity == GPR_LOG_SEVERITY_INFO  ? spdlog::level::info
                                                 : spdlog::level::debug;
  spdlog::log(level, "grpc: {} ({}:{}){}", message, file, args->line, repeated);
}

}  // namespace

void RouteGrpcLog(std::function<void()> on_handshake_failure) {
  {
    std::lock_guard lock(State().mu);
    State().on_handshake_failure = std::move(on_handshake_failure);
  }
  gpr_set_log_function(Log);
}

}  // namespace fedlora::common
