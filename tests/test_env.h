// A test Env (common/base/env.h): the real file system underneath, with writes that fail on demand
// and a clock that moves only when the test says so.
//
// Every mutating operation (WriteFile, WriteAt, Sync, Rename, Exchange, CreateDirectories) counts
// as one write. FailWrite(n, err) makes the n-th write from now fail with `err` (ENOSPC, EIO, ...)
// — just that one, or, `sticky`, that one and every write after it until Heal(), as a full disk
// does. A failing WriteFile leaves no file behind, as the real one does. writes() and log() say
// what was written, so a test can enumerate "each write the round close makes". FailPath fails the
// writes of one file; HoldPath holds one write in progress until the test lets it go.
#ifndef FEDLORA_TESTS_TEST_ENV_H_
#define FEDLORA_TESTS_TEST_ENV_H_

#include <cerrno>
#include <mutex>
#include <string>
#include <vector>

#include "absl/synchronization/notification.h"
#include "common/base/env.h"

namespace fedlora::testing {

class TestEnv final : public common::Env {
 public:
  explicit TestEnv(common::Env* base = common::Env::Default()) : base_(base) {}

  // The n-th write from now (1 = the next) fails with `err`; with `sticky`, every later one too.
  void FailWrite(int64_t n, int err = ENOSPC, bool sticky = false) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_at_ = writes_ + n;
    err_ = err;
    sticky_ = sticky;
  }
  // Every write to a path containing `part` fails with `err` until Heal() (a file that cannot be
  // written, say metrics.jsonl on a volume of its own).
  void FailPath(std::string part, int err = ENOSPC) {
    std::lock_guard<std::mutex> lock(mu_);
    fail_path_ = std::move(part);
    err_ = err;
  }
  // The next write to a path containing `part` notifies `reached` and waits for `release` before
  // it goes on (a write held in progress, say an export's last file).
  void HoldPath(std::string part, absl::Notification* reached, absl::Notification* release) {
    std::lock_guard<std::mutex> lock(mu_);
    hold_path_ = std::move(part);
    reached_ = reached;
    release_ = release;
  }
  void Heal() {
    std::lock_guard<std::mutex> lock(mu_);
    fail_at_ = -1;
    fail_path_.clear();
  }
  int64_t writes() {
    std::lock_guard<std::mutex> lock(mu_);
    return writes_;
  }
  int64_t failures() {
    std::lock_guard<std::mutex> lock(mu_);
    return failures_;
  }
  // "<operation> <path>" of every write so far, in order (failed ones marked "FAILED ").
  std::vector<std::string> log() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }
  void Advance(std::chrono::duration<double> d) {
    std::lock_guard<std::mutex> lock(mu_);
    now_ += std::chrono::duration_cast<std::chrono::steady_clock::duration>(d);
  }

  absl::Status WriteFile(const Path& path, const WriteFn& write) override {
    if (absl::Status st = Count("WriteFile", path); !st.ok()) return st;
    return base_->WriteFile(path, write);
  }
  absl::Status WriteAt(const Path& path, int64_t offset, std::string_view data) override {
    if (absl::Status st = Count("WriteAt", path); !st.ok()) return st;
    return base_->WriteAt(path, offset, data);
  }
  absl::Status Sync(const Path& path) override {
    if (absl::Status st = Count("Sync", path); !st.ok()) return st;
    return base_->Sync(path);
  }
  absl::Status Rename(const Path& from, const Path& to) override {
    if (absl::Status st = Count("Rename", to); !st.ok()) return st;
    return base_->Rename(from, to);
  }
  absl::Status Exchange(const Path& a, const Path& b) override {
    if (absl::Status st = Count("Exchange", b); !st.ok()) return st;
    return base_->Exchange(a, b);
  }
  absl::Status CreateDirectories(const Path& dir) override {
    if (absl::Status st = Count("CreateDirectories", dir); !st.ok()) return st;
    return base_->CreateDirectories(dir);
  }
  absl::Status RemoveAll(const Path& path) override { return base_->RemoveAll(path); }
  absl::StatusOr<std::vector<Path>> ListDirectory(const Path& dir) override {
    return base_->ListDirectory(dir);
  }

  SteadyTime Now() override {
    std::lock_guard<std::mutex> lock(mu_);
    return now_;
  }
  int64_t NowUnixMs() override {
    std::lock_guard<std::mutex> lock(mu_);
    return 1'700'000'000'000 +
           std::chrono::duration_cast<std::chrono::milliseconds>(now_.time_since_epoch()).count();
  }

 private:
  absl::Status Count(const char* op, const Path& path) {
    Hold(path);
    std::lock_guard<std::mutex> lock(mu_);
    ++writes_;
    const bool fail = (fail_at_ > 0 && (writes_ == fail_at_ || (sticky_ && writes_ > fail_at_))) ||
                      (!fail_path_.empty() && path.string().find(fail_path_) != std::string::npos);
    log_.push_back(std::string(fail ? "FAILED " : "") + op + " " + path.string());
    if (!fail) return absl::OkStatus();
    ++failures_;
    return common::ErrnoError(std::string("cannot ") + op, path, err_);
  }

  void Hold(const Path& path) {
    absl::Notification *reached = nullptr, *release = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (hold_path_.empty() || path.string().find(hold_path_) == std::string::npos) return;
      hold_path_.clear();
      reached = reached_;
      release = release_;
    }
    reached->Notify();
    release->WaitForNotification();
  }

  common::Env* base_;
  std::mutex mu_;
  std::string hold_path_;
  absl::Notification *reached_ = nullptr, *release_ = nullptr;
  int64_t writes_ = 0;
  int64_t fail_at_ = -1;
  int err_ = ENOSPC;
  bool sticky_ = false;
  std::string fail_path_;
  int64_t failures_ = 0;
  std::vector<std::string> log_;
  SteadyTime now_{std::chrono::hours(1)};
};

}  // namespace fedlora::testing

#endif  // FEDLORA_TESTS_TEST_ENV_H_
