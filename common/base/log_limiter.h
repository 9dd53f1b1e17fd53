// Keeps a log readable under stress: the same event (a join from one peer, a failing disk, a
// stalled round) is logged the first time and then at most once per window, with how many times
// it repeated meanwhile ("… (repeated 200 times in the last 10 s)").
#ifndef FEDLORA_COMMON_BASE_LOG_LIMITER_H_
#define FEDLORA_COMMON_BASE_LOG_LIMITER_H_

#include <chrono>
#include <cstdint>
#include <string>
#include <unordered_map>

#include "common/base/strings.h"

namespace fedlora::common {

class LogLimiter {
 public:
  using Clock = std::chrono::steady_clock;
  explicit LogLimiter(std::chrono::seconds window = std::chrono::seconds(10)) : window_(window) {}

  // Whether the event `key` is logged at `now`; if so, `*suffix` is what to append to the line
  // ("" or " (repeated N times in the last 10 s)"). Not thread-safe: call under the owner's lock.
  bool Allow(const std::string& key, Clock::time_point now, std::string* suffix) {
    auto [it, is_new] = events_.try_emplace(key, Event{now, 0});
    Event& e = it->second;
    if (!is_new && now - e.logged < window_) {
      ++e.held_back;
      return false;
    }
    *suffix = e.held_back == 0
                  ? std::string()
                  : StrCat(" (repeated ", e.held_back, " times in the last ",
                           std::chrono::duration_cast<std::chrono::seconds>(now - e.logged).count(),
                           " s)");
    e = Event{now, 0};
    if (events_.size() > kMaxKeys) events_.clear();  // bounded memory under many peers
    return true;
  }

 private:
  struct Event {
    Clock::time_point logged;
    int64_t held_back;
  };
  static constexpr size_t kMaxKeys = 4096;
  std::chrono::seconds window_;
  std::unordered_map<std::string, Event> events_;
};

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_LOG_LIMITER_H_
