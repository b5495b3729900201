#!/usr/bin/env bash
# Make the Dockerfile's base image locally when no image registry is reachable: a minimal Debian
# bookworm from debootstrap, imported into podman under the name the Dockerfile builds FROM.
#   deploy/docker/make_base.sh [IMAGE] [MIRROR]     (root; apt-get install debootstrap podman)
set -euo pipefail
image=${1:-debian:bookworm-slim}
mirror=${2:-http://deb.debian.org/debian}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
debootstrap --variant=minbase bookworm "$root" "$mirror" >/dev/null
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | CONTAINERS_CONF="$(dirname "$0")/containers.conf" podman import - "$image"
