#!/usr/bin/env bash
# image.sh: builds a FROM scratch container image of idem with podman, offline: the
# binary plus exactly the shared libraries `ldd` names (and CA certificates for TLS to
# vendors), running as uid 10001. No registry is contacted and nothing is run.
#
# Usage: scripts/image.sh [--debug] [TAG]     (default tag: localhost/idem:latest)
# --debug packages target/debug/idem instead of a release build (quicker, for CI checks).
# Skips with exit 0 and a message when podman is not installed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

profile=release
if [ "${1:-}" = "--debug" ]; then profile=debug; shift; fi
tag="${1:-localhost/idem:latest}"

if ! command -v podman >/dev/null 2>&1; then
  echo "image.sh: podman is not installed (Debian: apt-get install podman); the Dockerfile builds the same image with Docker" >&2
  exit 0
fi

if [ "$profile" = release ]; then cargo build --release --quiet --bin idem; else cargo build --quiet --bin idem; fi
binary="target/$profile/idem"

ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/etc/idem" "$ctx/rootfs/etc/ssl/certs" "$ctx/rootfs/tmp"
cp "$binary" "$ctx/rootfs/usr/local/bin/idem"
# The loader and every library the binary links, at the paths it expects them.
ldd "$binary" | awk '/=> \// { print $3 } /^\s*\/lib|^\s*\/usr/ { print $1 }' | sort -u | while read -r lib; do
  mkdir -p "$ctx/rootfs$(dirname "$lib")"
  cp -L "$lib" "$ctx/rootfs$lib"
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/"
fi
cp -r connectors "$ctx/rootfs/etc/idem/connectors"
cp idem.toml "$ctx/rootfs/etc/idem/idem.toml"
printf 'root:x:0:0:root:/:/nonexistent\nidem:x:10001:10001:idem:/nonexistent:/nonexistent\n' >"$ctx/rootfs/etc/passwd"
printf 'root:x:0:\nidem:x:10001:\n' >"$ctx/rootfs/etc/group"

cat >"$ctx/Containerfile" <<'CONTAINERFILE'
FROM scratch
COPY rootfs/ /
WORKDIR /etc/idem
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/idem"]
CONTAINERFILE

podman build --quiet --network=none --tag "$tag" "$ctx" >/dev/null
echo "built $tag ($profile binary, $(ldd "$binary" | grep -c '=>') shared libraries):"
podman image inspect "$tag" --format 'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} size={{.Size}} bytes'
# Running it is not possible on machines whose cgroups refuse containers; list its files instead.
podman image save --format oci-archive "$tag" -o "$ctx/image.tar" >/dev/null 2>&1 && echo "image archive: $(du -h "$ctx/image.tar" | cut -f1)"
