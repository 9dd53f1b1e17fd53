// This round's uploads: chunks arrive in any order and more than once, are spooled to the state
// store's incoming/ (memory does not grow with the cohort), and a complete upload is handed to the
// update gate's Check exactly once (`verifying` keeps its file still while it is checked); an
// accepted one moves into the store's blobs/, where the round's accumulator reads it back.
#ifndef FEDLORA_SERVER_UPLOADS_H_
#define FEDLORA_SERVER_UPLOADS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "fedlora/v1/coordinator.pb.h"
#include "server/accumulate/accumulator.h"
#include "server/state_store.h"

namespace fedlora::server {

namespace v1 = ::fedlora::v1;

// The byte ranges of an upload received so far, merged.
class ByteRanges {
 public:
  void AddRange(int64_t begin, int64_t end);
  // Length of the range starting at 0 (0 when there is none).
  int64_t Prefix() const;

 private:
  std::map<int64_t, int64_t> ranges_;  // begin → end, disjoint and not touching
};

struct PendingUpload {
  std::string sha256;
  int64_t total_size = 0;
  int64_t received = 0;    // contiguous bytes from 0 spooled to the part file
  ByteRanges ranges;       // every chunk received so far
  bool verifying = false;  // complete, and being checked outside the engine's lock
  bool accepted = false;
  int64_t weight = 0;  // the update's aggregation weight, once accepted
  double norm = 0;     // its ‖s·B·A‖_F (0 for a sketch step's answer)
  v1::TrainMetrics metrics;
};

// incoming/ file name of a client's update for a round (the identity made safe for a file name).
std::string PartName(int64_t round, const std::string& client);

class Uploads {
 public:
  explicit Uploads(StateStore* store) : store_(store) {}

  // Takes one chunk of `client`'s update for `round` (the caller has checked the round, the
  // cohort, the size limit and the sha256's form). Sets `*complete` when the last missing byte has
  // arrived: the upload is then marked verifying, and the caller must check it and call Accept or
  // Reject. A chunk for an upload being verified is UNAVAILABLE (retry); a different update after
  // an accepted one is ALREADY_EXISTS; a retry of an accepted one is answered as accepted.
  absl::StatusOr<v1::UploadResponse> Receive(int64_t round, const std::string& client,
                                             const v1::UploadRequest& request, bool* complete);
  // The verified upload becomes `client`'s accepted update (its part moved into blobs/).
  absl::Status Accept(int64_t round, const std::string& client, int64_t weight, double norm,
                      const v1::TrainMetrics& metrics);
  // Forgets `client`'s upload and deletes its part, if any.
  void Drop(int64_t round, const std::string& client);
  // Forgets every upload; deletes the parts of those not accepted.
  void Clear(int64_t round);

  const PendingUpload* Find(const std::string& client) const;
  bool Accepted(const std::string& client) const;
  bool AnyVerifying() const;
  std::vector<std::string> ArrivedIds() const;      // accepted, sorted by id
  size_t ArrivedCount() const { return arrived_; }  // without the copy: asked at every upload
  // The accepted updates, sorted by client: what the round's accumulator folds.
  std::vector<AcceptedUpdate> AcceptedUpdates() const;
  const std::map<std::string, PendingUpload>& all() const { return uploads_; }

 private:
  StateStore* store_;
  std::map<std::string, PendingUpload> uploads_;  // by client
  size_t arrived_ = 0;                            // how many of them are accepted
};

}  // namespace fedlora::server

#endif  // FEDLORA_SERVER_UPLOADS_H_
