// fedlora-client with fault hooks for the end-to-end tests (never installed, never in
// fedlora-client):
//   --testing-die-mid-upload F    exit at once, as if killed, before sending the chunk that would
//                                 take the first upload past fraction F of its bytes;
//   --testing-pause-mid-upload F  before that chunk, create the file --testing-pause-file and wait
//                                 until the test removes it (the coordinator is then mid-upload).
#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "client/client_options.h"

int main(int argc, char** argv) {
  double die_mid_upload = -1, pause_mid_upload = -1;
  std::string pause_file;
  bool paused = false;
  return fedlora::client::ClientMain(
      argc, argv, [&](CLI::App& app, fedlora::client::ClientOptions& o) {
        app.add_option("--testing-die-mid-upload", die_mid_upload,
                       "exit (as if killed) after sending this fraction of the first upload");
        app.add_option("--testing-pause-mid-upload", pause_mid_upload,
                       "pause after sending this fraction of the first upload");
        app.add_option("--testing-pause-file", pause_file,
                       "created while paused; the pause ends when it is removed");
        o.node.before_upload_chunk = [&](int64_t offset, int64_t total) {
          if (die_mid_upload >= 0 && offset >= static_cast<int64_t>(die_mid_upload * total))
            std::_Exit(9);
          if (!paused && pause_mid_upload >= 0 &&
              offset >= static_cast<int64_t>(pause_mid_upload * total)) {
            paused = true;
            std::ofstream(pause_file) << offset << "\n";
            while (std::filesystem::exists(pause_file))
              std::this_thread::sleep_for(std::chrono::milliseconds(20));
          }
        };
      });
}
