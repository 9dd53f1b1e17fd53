#!/usr/bin/env bash
# Makes a Docker engine ready for the compose test (deploy/compose_test.sh), where one can run: starts dockerd when
# none answers (as root; its log in /var/log/fedlora-dockerd.log, its pid in /run/fedlora-dockerd.pid so that the
# caller can stop what it started), makes the Debian base images if they are missing (deploy/base_image.sh) and
# checks that a container runs. With --build-base it then builds the `base` stage of deploy/Dockerfile (the runtime's
# packages), so that the test finds those layers cached. Exits 3, saying why, when no engine can be had here; 1 when a step after that fails.
set -euo pipefail
cd "$(dirname "$0")/.."
unavailable() { echo "docker engine: unavailable: $*" >&2; exit 3; }

if ! docker info > /dev/null 2>&1; then
  command -v dockerd > /dev/null || unavailable "dockerd is not installed (Debian package docker.io)"
  [[ $(id -u) -eq 0 ]] || unavailable "no engine answers and only root can start dockerd"
  setsid dockerd > /var/log/fedlora-dockerd.log 2>&1 < /dev/null &
  pid=$!
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break; sleep 0.5; done
  if ! docker info > /dev/null 2>&1; then
    kill "$pid" 2> /dev/null || true
    unavailable "dockerd did not start; /var/log/fedlora-dockerd.log ends: $(tail -n 3 /var/log/fedlora-dockerd.log)"
  fi
  echo "$pid" > /run/fedlora-dockerd.pid
  echo "docker engine: started dockerd (pid $pid)" >&2
fi
bash deploy/base_image.sh
out=$(docker run --rm debian:12 echo container-ok 2>&1) || unavailable "the engine cannot run a container: $out"
echo "docker engine: ready ($(docker version --format 'server {{.Server.Version}}'))" >&2
if [[ ${1:-} == --build-base ]]; then
  start=$SECONDS
  docker build -q --target base -t fedlora-base:latest -f deploy/Dockerfile . > /dev/null
  echo "docker engine: the base stage of deploy/Dockerfile built in $((SECONDS - start)) s" >&2
fi
