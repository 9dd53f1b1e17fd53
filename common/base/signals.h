// Clean shutdown on SIGTERM / SIGINT for the daemons: stop() becomes true at the first one.
//
// A handler (not a blocked mask and sigwait) takes the signal, so it works whichever thread the
// kernel picks — including threads that libraries start before main (OpenBLAS starts its own when
// it loads). The handler only stores the flag and writes the signal number to a pipe, both
// async-signal-safe; a thread of this object reads the pipe and logs. One instance per process.
#ifndef FEDLORA_COMMON_BASE_SIGNALS_H_
#define FEDLORA_COMMON_BASE_SIGNALS_H_

#include <fcntl.h>
#include <signal.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <thread>

namespace fedlora::common {

class StopOnSignals {
 public:
  StopOnSignals() {
    if (pipe2(pipe_, O_CLOEXEC) != 0) pipe_[0] = pipe_[1] = -1;
    write_fd_ = pipe_[1];
    stop_flag_ = &stop_;
    struct sigaction action = {};
    action.sa_handler = &Handle;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    sigaction(SIGTERM, &action, &old_term_);
    sigaction(SIGINT, &action, &old_int_);
    waiter_ = std::thread([this] {
      char sig = 0;
      while (pipe_[0] >= 0 && read(pipe_[0], &sig, 1) < 0 && errno == EINTR) {
      }
      if (sig != 0) spdlog::info("signal {}: shutting down", static_cast<int>(sig));
    });
  }
  ~StopOnSignals() {
    sigaction(SIGTERM, &old_term_, nullptr);
    sigaction(SIGINT, &old_int_, nullptr);
    const char zero = 0;  // releases the waiter when no signal came
    if (pipe_[1] >= 0) (void)!write(pipe_[1], &zero, 1);
    waiter_.join();
    stop_flag_ = nullptr;
    write_fd_ = -1;
    for (int fd : pipe_)
      if (fd >= 0) close(fd);
  }
  StopOnSignals(const StopOnSignals&) = delete;
  StopOnSignals& operator=(const StopOnSignals&) = delete;

  const std::atomic<bool>& stop() const { return stop_; }
  void RequestStop() { stop_ = true; }

 private:
  static void Handle(int sig) {
    if (std::atomic<bool>* stop = stop_flag_.load()) {
      if (stop->exchange(true)) return;  // logged once
    }
    const int fd = write_fd_.load();
    const char c = static_cast<char>(sig);
    if (fd >= 0) (void)!write(fd, &c, 1);
  }

  static inline std::atomic<std::atomic<bool>*> stop_flag_{nullptr};
  static inline std::atomic<int> write_fd_{-1};
  int pipe_[2] = {-1, -1};
  std::atomic<bool> stop_{false};
  struct sigaction old_term_ = {}, old_int_ = {};
  std::thread waiter_;
};

// A flag that a signal raises and a main loop takes (the coordinator's export on SIGUSR1). The
// handler only stores to an atomic; the signal's previous action comes back at destruction.
class FlagOnSignal {
 public:
  explicit FlagOnSignal(int sig) : sig_(sig) {
    struct sigaction action = {};
    action.sa_handler = [](int s) { raised_[s] = true; };
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;
    sigaction(sig_, &action, &old_);
  }
  ~FlagOnSignal() { sigaction(sig_, &old_, nullptr); }
  FlagOnSignal(const FlagOnSignal&) = delete;
  FlagOnSignal& operator=(const FlagOnSignal&) = delete;

  // True once per arrival (arrivals between two calls count once).
  bool Take() { return raised_[sig_].exchange(false); }

 private:
  static inline std::atomic<bool> raised_[NSIG];
  const int sig_;
  struct sigaction old_ = {};
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_SIGNALS_H_
