#!/usr/bin/env bash
# Builds Debian bookworm's own Abseil, Protobuf and gRPC source packages with ThreadSanitizer into PREFIX, so that a
# TSan build of fedlora sees the synchronisation inside them (Debian's binaries are not instrumented, and TSan then
# reports races in gRPC's call templates on every RPC). A one-off of about half an hour on 2 cores; the test command
# does not run it.
# Usage (as root): bash tests/tsan/build_deps.sh [PREFIX=/opt/fedlora-tsan] [WORKDIR=/var/tmp/fedlora-tsan-src]
# Then configure fedlora with -DFEDLORA_SANITIZE=thread -DCMAKE_PREFIX_PATH=PREFIX (tests/tsan/run.sh does both).
set -euo pipefail

prefix=${1:-/opt/fedlora-tsan}
work=${2:-/var/tmp/fedlora-tsan-src}
jobs=${JOBS:-$(nproc)}
flags="-fsanitize=thread -O1 -g1 -fno-omit-frame-pointer"

debian=('Origin: Debian' 'Codename: bookworm')
if [[ -z $(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Sources' "${debian[@]}") ]]; then
  # The source packages come from the same Debian archive as the binaries apt already uses.
  uri=$(apt-get indextargets --format '$(REPO_URI)' 'Created-By: Packages' "${debian[@]}" | head -1)
  cat >/etc/apt/sources.list.d/fedlora-tsan-src.sources <<EOF
Types: deb-src
URIs: ${uri}
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  apt-get update -qq
fi
apt-get install -y -qq dpkg-dev cmake ninja-build g++ zlib1g-dev libssl-dev libc-ares-dev libre2-dev >/dev/null

mkdir -p "$work" "$prefix"
cd "$work"
for pkg in abseil protobuf grpc; do
  ls -d "$pkg"-*/ >/dev/null 2>&1 || apt-get source -qq "$pkg" >/dev/null
done

# cmake_build NAME SOURCE_DIR ARGS...: configure, build and install one package unless it is already installed.
cmake_build() {
  local name=$1 src=$2
  shift 2
  [[ -e "$prefix/.$name.done" ]] && return 0
  echo "== $name ($(date +%T))"
  cmake -S "$src" -B "build-$name" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$prefix" \
    -DCMAKE_INSTALL_LIBDIR=lib -DCMAKE_PREFIX_PATH="$prefix" -DBUILD_SHARED_LIBS=ON -DCMAKE_CXX_STANDARD=17 \
    -DCMAKE_C_FLAGS_RELEASE="$flags" -DCMAKE_CXX_FLAGS_RELEASE="$flags" \
    -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=thread -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=thread \
    -DCMAKE_INSTALL_RPATH="$prefix/lib" "$@" >/dev/null
  cmake --build "build-$name" -j "$jobs"
  cmake --install "build-$name" >/dev/null
  touch "$prefix/.$name.done"
}

cmake_build abseil abseil-*/ -DBUILD_TESTING=OFF
cmake_build protobuf protobuf-*/ -Dprotobuf_BUILD_TESTS=OFF -Dprotobuf_BUILD_PROTOC_BINARIES=OFF -Dprotobuf_BUILD_LIBPROTOC=ON \
  -Dprotobuf_WITH_ZLIB=ON
# The code generators stay Debian's (protoc and grpc_cpp_plugin of the same versions): only the runtime libraries
# need the instrumentation (libprotoc above is there because gRPC's CMake links its plugin-support library with it).
cmake_build grpc grpc-*/ -DgRPC_ABSL_PROVIDER=package -DgRPC_CARES_PROVIDER=package -DgRPC_PROTOBUF_PROVIDER=package \
  -DgRPC_RE2_PROVIDER=package -DgRPC_SSL_PROVIDER=package -DgRPC_ZLIB_PROVIDER=package -DgRPC_BUILD_TESTS=OFF \
  -DgRPC_BUILD_CODEGEN=OFF -DgRPC_BUILD_GRPC_CPP_PLUGIN=OFF -DgRPC_BUILD_GRPC_CSHARP_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_NODE_PLUGIN=OFF -DgRPC_BUILD_GRPC_OBJECTIVE_C_PLUGIN=OFF -DgRPC_BUILD_GRPC_PHP_PLUGIN=OFF \
  -DgRPC_BUILD_GRPC_PYTHON_PLUGIN=OFF -DgRPC_BUILD_GRPC_RUBY_PLUGIN=OFF -DgRPC_BACKWARDS_COMPATIBILITY_MODE=OFF
echo "TSan-instrumented Abseil, Protobuf and gRPC are in $prefix"
