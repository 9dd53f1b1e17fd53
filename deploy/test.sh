#!/usr/bin/env bash
# Sets everything up and runs fedlora's test suite: installs the Debian packages, configures and builds with CMake,
# then runs every test with CTest (unit tests, end-to-end tests that start the real programs, and the docker-compose
# simulation where a Docker engine can run, its image made around the programs built here), and last a bounded run of
# the libFuzzer targets (tests/fuzz/run.sh: clang, ASan + UBSan, in build-fuzz/; FEDLORA_FUZZ_SECONDS, default 60, in
# all; 0 leaves it out, and with it the clang build's -Wthread-safety -Werror check of the lock annotations). The engine, the Debian base images and the image's packages (deploy/docker_engine.sh) go on
# in the background while fedlora compiles here; a dockerd started for the tests is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install_deps.sh
stop_engine() {
  local pid
  pid=$(cat /run/fedlora-dockerd.pid 2> /dev/null) || return 0
  if [[ $(cat "/proc/$pid/comm" 2> /dev/null) == dockerd ]]; then
    kill "$pid"
    for _ in $(seq 40); do [[ -e /proc/$pid ]] || break; sleep 0.5; done
  fi
  rm -f /run/fedlora-dockerd.pid
}
trap stop_engine EXIT
# The fuzz targets' build (clang, in build-fuzz/) runs at the lowest priority from the start: it takes
# only the CPU time the main build and the tests leave (the tests wait on processes and sockets much of
# the time), which is most of the ten minutes it needs, without slowing either.
fuzz_seconds=${FEDLORA_FUZZ_SECONDS:-60}
fuzz_log=$(mktemp)
if ((fuzz_seconds > 0)); then
  nice -n 19 bash tests/fuzz/run.sh --build-only > "$fuzz_log" 2>&1 &
  fuzz_build=$!
fi
engine_log=$(mktemp)
bash deploy/docker_engine.sh --build-base > "$engine_log" 2>&1 &
engine=$!
# The benchmark programs are built too: each runs once at a small size (tests/bench/CMakeLists.txt), so a bench that
# no longer runs fails here, not when someone next wants its figures (their compile is about a minute).
FEDLORA_BUILD_BENCHMARKS=ON bash deploy/build.sh
rc=0
wait "$engine" || rc=$?
case $rc in
  0) grep '^docker engine:' "$engine_log" ;;
  3) grep '^docker engine:' "$engine_log"; echo "the compose simulation will be skipped, its files only parsed" ;;
  *) tail -n 30 "$engine_log"; echo "docker engine: setting up failed (exit $rc); the compose test will try again" ;;
esac
rm -f "$engine_log"
(cd build && ctest --output-on-failure --parallel "$(nproc)" --timeout 600)
if ((fuzz_seconds > 0)); then
  wait "$fuzz_build" || { tail -n 30 "$fuzz_log"; echo "fuzz: building the targets failed"; exit 1; }
  FEDLORA_FUZZ_BUILD=build-fuzz bash tests/fuzz/run.sh "$fuzz_seconds"
fi
rm -f "$fuzz_log"
