#include "client/upload.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <thread>
#include <vector>

namespace fedlora::client {

grpc::Status UploadInChunks(const v1::UploadRequest& header, const std::string& bytes,
                            const UploadSettings& settings, const SendChunk& send) {
  const int64_t size = static_cast<int64_t>(bytes.size());
  const int64_t chunk = std::max<int64_t>(settings.chunk_bytes, 1);
  const int64_t chunks = std::max<int64_t>((size + chunk - 1) / chunk, 1);
  auto request_at = [&](int64_t offset) {
    if (settings.before_chunk) settings.before_chunk(offset);
    v1::UploadRequest request = header;
    request.set_offset(offset);
    request.set_data(bytes.substr(static_cast<size_t>(offset),
                                  static_cast<size_t>(std::min(chunk, size - offset))));
    return request;
  };

  // Pipelined pass: every chunk once, `window` at a time.
  std::atomic<int64_t> next{0};
  std::atomic<bool> accepted{false};
  std::mutex mu;
  grpc::Status failure;
  auto worker = [&] {
    for (int64_t i = next++; i < chunks; i = next++) {
      v1::UploadResponse response;
      grpc::Status s = send(request_at(i * chunk), &response);
      std::lock_guard<std::mutex> lock(mu);
      if (!s.ok()) {
        if (failure.ok()) failure = s;
        return;
      }
      if (response.accepted()) accepted = true;
    }
  };
  std::vector<std::thread> pool;
  const int threads = static_cast<int>(std::min<int64_t>(std::max(settings.window, 1), chunks));
  for (int t = 1; t < threads; ++t) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  if (accepted) return grpc::Status::OK;
  // A refusal other than a transient one ends the upload; after a lost chunk, resume from the
  // coordinator's prefix.
  if (!failure.ok() && failure.error_code() != grpc::StatusCode::UNAVAILABLE &&
      failure.error_code() != grpc::StatusCode::DEADLINE_EXCEEDED) {
    return failure;
  }
  for (int64_t offset = 0;;) {
    v1::UploadResponse response;
    grpc::Status s = send(request_at(offset), &response);
    if (!s.ok()) return s;
    if (response.accepted()) return grpc::Status::OK;
    offset = response.received();
  }
}

}  // namespace fedlora::client
