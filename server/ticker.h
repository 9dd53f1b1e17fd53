// Calls RoundEngine::Tick every 50 ms on a thread of its own, from construction until Stop (or
// destruction): deadlines, client timeouts, retries and expired long polls are applied on it.
#ifndef FEDLORA_SERVER_TICKER_H_
#define FEDLORA_SERVER_TICKER_H_

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include "server/round/engine.h"

namespace fedlora::server {

class Ticker {
 public:
  explicit Ticker(RoundEngine* engine)
      : thread_([this, engine] {
          std::unique_lock<std::mutex> lock(mu_);
          while (!stop_) {
            cv_.wait_for(lock, std::chrono::milliseconds(50));
            if (stop_) break;
            lock.unlock();
            engine->Tick();
            lock.lock();
          }
        }) {}
  Ticker(const Ticker&) = delete;
  Ticker& operator=(const Ticker&) = delete;
  ~Ticker() { Stop(); }

  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;  // last: starts after the members it uses exist
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_TICKER_H_
