// Clean shutdown on SIGTERM / SIGINT for the daemons. Construct it in main before starting any
// thread: it blocks both signals for the process and waits for them on a thread of its own; stop()
// becomes true at the first one.
#ifndef FEDLORA_COMMON_SIGNALS_H_
#define FEDLORA_COMMON_SIGNALS_H_

#include <pthread.h>
#include <signal.h>
#include <spdlog/spdlog.h>

#include <atomic>
#include <thread>

namespace fedlora::common {

class StopOnSignals {
 public:
  StopOnSignals() {
    sigemptyset(&signals_);
    sigaddset(&signals_, SIGTERM);
    sigaddset(&signals_, SIGINT);
    pthread_sigmask(SIG_BLOCK, &signals_, nullptr);
    waiter_ = std::thread([this] {
      int sig = 0;
      sigwait(&signals_, &sig);
      if (!stop_.exchange(true)) spdlog::info("signal {}: shutting down", sig);
    });
  }
  ~StopOnSignals() {
    stop_ = true;
    pthread_kill(waiter_.native_handle(), SIGTERM);  // releases sigwait when no signal came
    waiter_.join();
  }
  StopOnSignals(const StopOnSignals&) = delete;
  StopOnSignals& operator=(const StopOnSignals&) = delete;

  const std::atomic<bool>& stop() const { return stop_; }
  void RequestStop() { stop_ = true; }

 private:
  sigset_t signals_;
  std::atomic<bool> stop_{false};
  std::thread waiter_;
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_SIGNALS_H_
