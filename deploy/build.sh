#!/usr/bin/env bash
# Installs dependencies, then configures and builds fedlora into ./build (programs in build/bin/).
# Extra arguments go to CMake's configure step, e.g. deploy/build.sh -DFEDLORA_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install_deps.sh
# FEDLORA_BUILD_BENCHMARKS=OFF (the test command) leaves out the benchmark programs; said each time, since CMake's
# cache would otherwise keep the last value.
# A unity build (CMake joins each target's files in batches of 8): the same headers and templates are
# compiled once per batch instead of once per file: a clean build of what the test command builds took 12.7
# CPU-minutes instead of about 30 (2 cores, Debian 12).
# FEDLORA_UNITY_BUILD=OFF builds file by file (quicker to rebuild after editing one file).
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="${FEDLORA_BUILD_TYPE:-Release}" \
  -DFEDLORA_BUILD_BENCHMARKS="${FEDLORA_BUILD_BENCHMARKS:-ON}" -DCMAKE_UNITY_BUILD="${FEDLORA_UNITY_BUILD:-ON}" "$@"
cmake --build build --parallel "$(nproc)"
