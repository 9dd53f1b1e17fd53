// fedlora-client with fault hooks for the end-to-end tests (never installed, never in
// fedlora-client):
//   --testing-die-mid-upload F   exit at once, as if killed, before sending the chunk that would
//   take the
//                                first upload past fraction F of its bytes.
#include <cstdlib>

#include "client/client_options.h"

int main(int argc, char** argv) {
  double die_mid_upload = -1;
  return fedlora::client::ClientMain(
      argc, argv, [&](CLI::App& app, fedlora::client::ClientOptions& o) {
        app.add_option("--testing-die-mid-upload", die_mid_upload,
                       "exit (as if killed) after sending this fraction of the first upload");
        o.node.before_upload_chunk = [&die_mid_upload](int64_t offset, int64_t total) {
          if (die_mid_upload >= 0 && offset >= static_cast<int64_t>(die_mid_upload * total))
            std::_Exit(9);
        };
      });
}
