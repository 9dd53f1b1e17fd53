#!/usr/bin/env bash
# Installs the Debian 12 packages fedlora needs to build, test and run. Idempotent: packages that are
# already installed are not fetched again, and apt-get update runs only when something is missing.
set -euo pipefail

# With --build-only, just what building the programs needs (the Dockerfile's build stage); otherwise also what the
# tests and benchmarks need.
packages=(
  build-essential cmake ninja-build pkg-config git openssl ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libeigen3-dev libssl-dev libspdlog-dev libfmt-dev libabsl-dev
  nlohmann-json3-dev libcli11-dev libpcre2-dev libutf8proc-dev libopenblas-pthread-dev
  libtomlplusplus-dev libcpp-httplib-dev
)
optional=()
if [[ "${1:-}" != --build-only ]]; then
  packages+=(libgtest-dev libgmock-dev libbenchmark-dev clang-format docker-compose docker.io debootstrap
    clang libclang-rt-14-dev llvm gnuplot-nox python3-grpcio)
  # Real operators' tools for the tests of the coordinator's /metrics and live page, which skip with a message
  # when these cannot be installed.
  optional=(prometheus chromium)
fi

missing=() missing_optional=()
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for p in "${packages[@]}"; do installed "$p" || missing+=("$p"); done
for p in "${optional[@]}"; do installed "$p" || missing_optional+=("$p"); done
if ((${#missing[@]} + ${#missing_optional[@]})); then
  if [[ $(id -u) -ne 0 ]]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -q
fi
if ((${#missing[@]})); then
  echo "fedlora: installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
if ((${#missing_optional[@]})); then
  echo "fedlora: installing ${missing_optional[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing_optional[@]}" ||
    echo "fedlora: could not install ${missing_optional[*]}; the tests that use them will skip" >&2
fi
