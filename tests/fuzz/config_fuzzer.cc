// The TOML config loader of fedlora-server and fedlora-client (CLI11's config reader with the
// programs' own option definitions and checks): any file either loads, or is refused with an
// error, and a loaded one is either accepted by Validate() or refused by it with a message — never
// a crash, a hang or an exception that escapes.
#include <CLI/CLI.hpp>
#include <cstdint>
#include <sstream>
#include <string>

#include "client/client_options.h"
#include "server/server_options.h"
#include "tests/fuzz/fuzz_util.h"

namespace {
template <typename Options, typename Add>
void Load(const std::string& text, Add add) {
  Options options;
  CLI::App app;
  add(app, options);
  std::istringstream in(text);
  try {
    app.parse_from_stream(in);
  } catch (const CLI::Error&) {
    return;  // refused by the loader, with its message
  }
  const absl::Status st = options.Validate();
  FUZZ_CHECK(st.ok() || !st.message().empty());
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  Load<fedlora::server::ServerOptions>(text, fedlora::server::AddServerFlags);
  Load<fedlora::client::ClientOptions>(text, fedlora::client::AddClientFlags);
  return 0;
}
