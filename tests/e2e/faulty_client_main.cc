// fedlora-client with fault hooks for the end-to-end tests (never installed, never in
// fedlora-client):
//   --testing-die-mid-upload F    exit at once, as if killed, before sending the chunk that would
//                                 take the first upload past fraction F of its bytes;
//   --testing-pause-mid-upload F  before that chunk, create the file --testing-pause-file and wait
//                                 until the test removes it (the coordinator is then mid-upload);
//   --testing-die-at-secagg STEP[@K]  under secure aggregation, SIGKILL itself before taking STEP
//                                 (keys, shares, input, consent, reveal; correction: lora-fair's
//                                 second sum) the K-th time (default the first);
//   --testing-pause-at-secagg STEP  before taking STEP the first time, create --testing-pause-file
//                                 and wait until the test removes it;
// and, as a hostile client would, changes each trained update before it is sent:
//   --testing-scale-update F      every B multiplied by F (so s·B·A by F);
//   --testing-lora-alpha A        every module's scaling set to A / r;
//   --testing-claim-examples N    N examples claimed;
// and, so a test can compute what a secure aggregation should give, keeps a copy of each:
//   --testing-save-updates DIR    the k-th trained update (as changed) in DIR/update-<k>.bin.
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <thread>

#include "client/client_options.h"
#include "common/tensor/blob.h"

int main(int argc, char** argv) {
  double die_mid_upload = -1, pause_mid_upload = -1, scale_update = 1, lora_alpha = 0;
  int64_t claim_examples = 0;
  std::string pause_file, die_at_secagg, pause_at_secagg, save_updates;
  int saved = 0, die_count = 0;
  bool paused = false;
  return fedlora::client::ClientMain(
      argc, argv, [&](CLI::App& app, fedlora::client::ClientOptions& o) {
        app.add_option("--testing-die-mid-upload", die_mid_upload,
                       "exit (as if killed) after sending this fraction of the first upload");
        app.add_option("--testing-pause-mid-upload", pause_mid_upload,
                       "pause after sending this fraction of the first upload");
        app.add_option("--testing-pause-file", pause_file,
                       "created while paused; the pause ends when it is removed");
        app.add_option("--testing-die-at-secagg", die_at_secagg,
                       "SIGKILL itself before this secure aggregation step");
        app.add_option("--testing-scale-update", scale_update, "multiply every B by this");
        app.add_option("--testing-pause-at-secagg", pause_at_secagg,
                       "pause before this secure aggregation step");
        o.node.before_secagg_step = [&](std::string_view step) {
          const size_t at = die_at_secagg.find('@');
          if (step == die_at_secagg.substr(0, at) &&
              ++die_count >=
                  (at == std::string::npos ? 1 : std::stoi(die_at_secagg.substr(at + 1))))
            raise(SIGKILL);
          if (!paused && step == pause_at_secagg) {
            paused = true;
            std::ofstream(pause_file) << step << "\n";
            while (std::filesystem::exists(pause_file))
              std::this_thread::sleep_for(std::chrono::milliseconds(20));
          }
        };
        app.add_option("--testing-lora-alpha", lora_alpha, "set every scaling to this / r");
        app.add_option("--testing-claim-examples", claim_examples, "claim this many examples");
        app.add_option("--testing-save-updates", save_updates,
                       "keep each update in this directory");
        o.node.before_upload = [&](fedlora::common::Adapter& update, int64_t& num_examples) {
          for (size_t i = 0; i < update.num_modules(); ++i) {
            if (scale_update != 1) update.B(i) *= static_cast<float>(scale_update);
            if (lora_alpha != 0) update.set_scaling(i, lora_alpha / update.module(i).rank);
          }
          if (claim_examples > 0) num_examples = claim_examples;
          if (!save_updates.empty()) {
            std::filesystem::create_directories(save_updates);
            std::ofstream(std::filesystem::path(save_updates) /
                              ("update-" + std::to_string(++saved) + ".bin"),
                          std::ios::binary)
                << fedlora::common::EncodeAdapter(update, fedlora::common::AdapterParts::kAll);
          }
        };
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
