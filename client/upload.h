// Chunked, pipelined upload of one update: up to `window` chunks in flight at distinct offsets (so
// encryption, transfer, parsing and the coordinator's spool write overlap), then, if anything was
// lost, a sequential resume from what the coordinator reports it holds. Idempotent: chunks and
// whole uploads may be repeated.
#ifndef FEDLORA_CLIENT_UPLOAD_H_
#define FEDLORA_CLIENT_UPLOAD_H_

#include <grpcpp/grpcpp.h>

#include <functional>
#include <string>

#include "fedlora/v1/coordinator.pb.h"

namespace fedlora::client {

// Sends one chunk (with whatever retrying the caller wants) and fills the response.
using SendChunk = std::function<grpc::Status(const v1::UploadRequest&, v1::UploadResponse*)>;

struct UploadSettings {
  int64_t chunk_bytes = 1 << 20;
  int window = 4;  // chunks in flight at once
  // Called with each chunk's offset before it is sent (an instrumentation point: the fault tests'
  // client build stops there as if killed); may be empty.
  std::function<void(int64_t offset)> before_chunk;
};

// `header` holds everything but offset and data (round, state version, sha256, total size,
// examples, metrics).
grpc::Status UploadInChunks(const v1::UploadRequest& header, const std::string& bytes,
                            const UploadSettings& settings, const SendChunk& send);

}  // namespace fedlora::client

#endif  // FEDLORA_CLIENT_UPLOAD_H_
