#!/usr/bin/env bash
# Installs what shoal's end-to-end tests need on a fresh Debian machine: the CNCF registry
# (docker-registry), containerd with ctr, htpasswd for the private-registry test, and
# iproute2 (ip, tc) for the network-namespace benches, aria2, opentracker and mktorrent for
# their BitTorrent baseline.
# Idempotent: does nothing when everything is already there. Needs root (or sudo).
set -euo pipefail

packages=(docker-registry containerd apache2-utils iproute2 aria2 opentracker mktorrent)
tools=(docker-registry containerd ctr htpasswd ip tc aria2c opentracker mktorrent)

missing=()
for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || missing+=("$t")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

echo "install-test-deps: missing ${missing[*]}; installing ${packages[*]}" >&2
as_root=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-test-deps: run as root (or install sudo)" >&2; exit 1; }
  as_root=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${as_root[@]}" apt-get update -q
"${as_root[@]}" apt-get install -y -q --no-install-recommends "${packages[@]}"

for t in "${tools[@]}"; do
  command -v "$t" >/dev/null 2>&1 || { echo "install-test-deps: $t still missing after install" >&2; exit 1; }
done
