#!/usr/bin/env bash
# Installs dependencies, then configures and builds fedlora into ./build (programs in build/bin/).
# Extra arguments go to CMake's configure step, e.g. deploy/build.sh -DFEDLORA_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install_deps.sh
# FEDLORA_BUILD_BENCHMARKS=OFF (the test command) leaves out the benchmark programs; said each time, since CMake's
# cache would otherwise keep the last value.
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="${FEDLORA_BUILD_TYPE:-Release}" \
  -DFEDLORA_BUILD_BENCHMARKS="${FEDLORA_BUILD_BENCHMARKS:-ON}" "$@"
cmake --build build --parallel "$(nproc)"
