#!/usr/bin/env bash
# Build the agent image without pulling anything (no registry is reachable from these machines):
#   1. mmdebstrap makes a Debian bookworm rootfs and `podman import` turns it into the local base image
#      (skipped when that image exists already; MEMBRANE_REBUILD_BASE=1 forces it);
#   2. buildah builds the Dockerfile with chroot isolation and the host network, with the machine's CA
#      bundle and a pip.conf naming it mounted into every RUN, since pip verifies TLS against that bundle.
# Prints the image's size in bytes as the last line. Environment:
#   MEMBRANE_IMAGE       the tag to build           (default localhost/membrane:0.1.0)
#   MEMBRANE_BASE_IMAGE  the base image's name      (default localhost/debian:bookworm-slim)
#   MEMBRANE_CA_BUNDLE   the CA bundle to mount     (default /etc/ssl/certs/ca-certificates.crt)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
image=${MEMBRANE_IMAGE:-localhost/membrane:0.1.0}
base=${MEMBRANE_BASE_IMAGE:-localhost/debian:bookworm-slim}
ca=${MEMBRANE_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}

for tool in mmdebstrap podman buildah; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is not installed (make image installs it)" >&2; exit 2; }
done
[ -r "$ca" ] || { echo "build-image: CA bundle $ca is not readable" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

start=$(date +%s)
if [ "${MEMBRANE_REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$base"; then
  echo "build-image: base $base from mmdebstrap"
  # Like Docker's debian:bookworm-slim: /usr merged by mmdebstrap's hook (the usrmerge package would
  # pull in perl), no recommends, and dpkg keeps no docs, man pages or translations (the setting stays
  # in the image, so packages installed later skip them too).
  mmdebstrap --quiet --variant=apt \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --aptopt='Acquire::Check-Valid-Until "false"' --aptopt='APT::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    bookworm "$work/rootfs.tar"
  podman import --quiet "$work/rootfs.tar" "$base" >/dev/null
  rm -f "$work/rootfs.tar"
fi
base_done=$(date +%s)

# The bundle is mounted beside, not over, /etc/ssl/certs: nothing in the image installs it.
printf '[global]\ncert = /run/membrane-build/ca.crt\n' > "$work/pip.conf"
buildah bud --quiet --isolation chroot --network host --layers=false \
  --volume "$ca:/run/membrane-build/ca.crt:ro" \
  --volume "$work/pip.conf:/etc/pip.conf:ro" \
  --build-arg "BASE=$base" \
  --tag "$image" --file "$root/Dockerfile" "$root" >/dev/null
end=$(date +%s)

echo "build-image: $image built (base $((base_done - start)) s, image $((end - base_done)) s)"
podman image inspect --format '{{.Size}}' "$image"
