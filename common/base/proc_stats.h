// A process's CPU time and memory as Linux reports them in /proc: for the coordinator's own
// metrics (server/observe/run_view.cc) and for benchmarks that watch another process.
#ifndef FEDLORA_COMMON_BASE_PROC_STATS_H_
#define FEDLORA_COMMON_BASE_PROC_STATS_H_

#include <sys/types.h>
#include <unistd.h>

#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <string_view>

#include "common/base/strings.h"

namespace fedlora::common {

// User + system CPU seconds of process `pid` (0: this one), from /proc/PID/stat; 0 when it
// cannot be read.
inline double CpuSeconds(pid_t pid = 0) {
  std::ifstream in(pid == 0 ? std::string("/proc/self/stat") : StrCat("/proc/", pid, "/stat"));
  const std::string stat((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  // The command name may hold spaces; it ends at the last ')'. The state is field 3, utime and
  // stime are fields 14 and 15.
  const size_t end = stat.rfind(')');
  if (end == std::string::npos || end + 2 > stat.size()) return 0;
  std::istringstream fields(stat.substr(end + 2));
  std::string field;
  double ticks = 0;
  for (int i = 3; i <= 15 && fields >> field; ++i)
    if (i >= 14) ticks += std::stod(field);
  return ticks / static_cast<double>(sysconf(_SC_CLK_TCK));
}

// A memory field of /proc/PID/status in bytes (`field` "VmRSS:" the resident set, "VmHWM:" its
// peak; pid 0: this process); 0 when absent.
inline double StatusBytes(std::string_view field, pid_t pid = 0) {
  std::ifstream in(pid == 0 ? std::string("/proc/self/status") : StrCat("/proc/", pid, "/status"));
  for (std::string line; std::getline(in, line);)
    if (line.starts_with(field)) return 1024 * std::stod(line.substr(field.size()));  // kB
  return 0;
}

}  // namespace fedlora::common

#endif  // FEDLORA_COMMON_BASE_PROC_STATS_H_
