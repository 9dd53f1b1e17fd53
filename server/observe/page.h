// The live page's files (server/observe/page.cc), served from the binary: the page loads nothing
// from anywhere else, and polls /api/run for its data.
#ifndef FEDLORA_SERVER_OBSERVE_PAGE_H_
#define FEDLORA_SERVER_OBSERVE_PAGE_H_

#include <span>
#include <string_view>

namespace fedlora::server {

struct PageAsset {
  const char* path;  // "/", "/page.js", "/page.css"
  std::string_view content;
  const char* type;  // its Content-Type
};

std::span<const PageAsset> PageAssets();

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_OBSERVE_PAGE_H_
