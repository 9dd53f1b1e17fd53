#!/usr/bin/env bash
# Sets everything up and runs fedlora's test suite: installs the Debian packages, configures and builds with CMake,
# then runs every test with CTest (unit tests, and end-to-end tests that start the real programs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/build.sh
cd build
ctest --output-on-failure --parallel "$(nproc)" --timeout 600
