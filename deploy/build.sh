#!/usr/bin/env bash
# Installs dependencies, then configures and builds fedlora into ./build (programs in build/bin/).
# Extra arguments go to CMake's configure step, e.g. deploy/build.sh -DFEDLORA_SANITIZE=ON.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install_deps.sh
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE="${FEDLORA_BUILD_TYPE:-Release}" "$@"
cmake --build build --parallel "$(nproc)"
