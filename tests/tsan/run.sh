#!/usr/bin/env bash
# The federation tests under ThreadSanitizer: the real fedlora-server and fedlora-client processes over mutual TLS
# (tests/e2e/federation_test.cc), and the coordinator's and the client's unit tests, built with -fsanitize=thread
# against Abseil, Protobuf and gRPC built with it too (tests/tsan/build_deps.sh, run first when PREFIX lacks them;
# about half an hour). Every process writes its reports to a file of its own; the run fails if any file is written.
# Usage (as root): bash tests/tsan/run.sh [CTEST_REGEX]   (PREFIX: $FEDLORA_TSAN_PREFIX, default /opt/fedlora-tsan)
set -euo pipefail
cd "$(dirname "$0")/../.."
prefix=${FEDLORA_TSAN_PREFIX:-/opt/fedlora-tsan}
build=${FEDLORA_TSAN_BUILD:-build-tsan-grpc}
[[ -e "$prefix/.grpc.done" ]] || bash tests/tsan/build_deps.sh "$prefix"
bash deploy/install_deps.sh

cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFEDLORA_SANITIZE=thread -DCMAKE_CXX_FLAGS_RELEASE="-O1 -g1" \
  -DFEDLORA_BUILD_BENCHMARKS=OFF -DCMAKE_PREFIX_PATH="$prefix" \
  -DFEDLORA_TSAN_SUPPRESSIONS="$PWD/tests/tsan/instrumented.supp" >/dev/null
cmake --build "$build" --target fedlora_federation_test fedlora_server_test fedlora_client_test

# A binary that loaded Debian's gRPC or Abseil instead would report their synchronisation as races: refuse to run.
for program in fedlora-server fedlora-client; do
  for lib in libgrpc++.so libgrpc.so libgpr.so libabsl_synchronization.so libprotobuf.so; do
    where=$(ldd "$build/bin/$program" | awk -v l="$lib" 'index($1, l) == 1 {print $3}')
    if [[ "$where" != "$prefix"/* ]]; then
      echo "$program loads $lib from '${where:-nowhere}', not from $prefix" >&2
      exit 1
    fi
  done
done

reports=$(mktemp -d /tmp/fedlora-tsan-reports.XXXXXX)
export TSAN_OPTIONS="log_path=$reports/report"
status=0
# The three programs built above; the other programs' tests and the scripted ones are not built here.
(cd "$build" && ctest --parallel 2 --timeout 1800 -R "${1:-.}" -E '_NOT_BUILT|^(e2e|deploy|format)\.') || status=$?
count=$(find "$reports" -type f | wc -l)
echo "TSan reports: $count (in $reports, one file per process that reported)"
if ((count > 0)); then
  grep -h -A3 "^WARNING: ThreadSanitizer" "$reports"/* | head -60 >&2
  status=1
fi
exit "$status"
