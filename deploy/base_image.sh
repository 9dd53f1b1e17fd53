#!/usr/bin/env bash
# Makes the base images the Dockerfile builds from, debian:12 and debian:12-slim, from the Debian archive, for hosts
# that cannot reach Docker Hub: debootstrap (minbase) of bookworm from the mirror apt already uses, imported into the
# local Docker engine. Does nothing when both images exist. Needs root, debootstrap and a running Docker engine.
set -euo pipefail
if docker image inspect debian:12 > /dev/null 2>&1 && docker image inspect debian:12-slim > /dev/null 2>&1; then
  exit 0
fi
# The first Debian mirror in apt's sources (awk reads them all: no early close, so no SIGPIPE under pipefail).
mirror=$({ grep -rhoE '^(URIs: |deb )https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ \
           2> /dev/null || true; } | awk 'NR == 1 { sub(/^(URIs: |deb )/, ""); sub(/ *$/, ""); print }')
mirror=${mirror:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
echo "fedlora: making debian:12 from $mirror (debootstrap --variant=minbase bookworm)" >&2
debootstrap --variant=minbase bookworm "$root" "$mirror" > /dev/null
tar -C "$root" -c . | docker import - debian:12 > /dev/null
docker tag debian:12 debian:12-slim
