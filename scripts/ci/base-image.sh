#!/usr/bin/env bash
# Build the base image the Dockerfile is built FROM on machines that cannot pull from a registry:
# a debootstrap --variant=minbase of Debian bookworm with python3, pip and venv, imported with docker import
# as local/python:3.11-bookworm and also tagged python:3.11-slim (so an unmodified `FROM python:3.11-slim` builds).
# Cached: does nothing when the image already exists (~0.1 s). From nothing: ~1-2 min.
# Needs DOCKER_HOST from scripts/ci/dockerd-up.sh. Prints the image name on stdout.
set -euo pipefail

IMAGE="${BASE_IMAGE:-local/python:3.11-bookworm}"
ALIAS="${BASE_IMAGE_ALIAS:-python:3.11-slim}"
SUITE=bookworm

log() { printf 'base-image: %s\n' "$*" >&2; }

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE already exists; nothing to do"
else
  if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  fi

  # The mirror this machine's apt uses: the first URIs: line of the non-security source.
  mirror=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    mirror="$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)"
  fi
  mirror="${mirror:-http://deb.debian.org/debian}"

  rootfs="$(mktemp -d /var/tmp/aqueduct-rootfs.XXXXXX)"
  trap 'rm -rf "$rootfs"' EXIT
  log "debootstrap --variant=minbase $SUITE from $mirror into $rootfs"
  debootstrap --variant=minbase \
    --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
    "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 20 "$rootfs.log" >&2; exit 1; }
  rm -f "$rootfs.log"

  # Trust the same CAs the host trusts (PyPI is reached through a re-signing egress proxy here),
  # so pip inside `docker build --network host` can reach the index the host uses.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null 2>&1
  fi
  # Behave like the official python image: pip may install into the system interpreter (PEP 668 off).
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  # Smaller image: apt lists and caches are not needed at run time.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb

  log "docker import as $IMAGE"
  tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
fi

if [[ -n "$ALIAS" ]]; then
  docker tag "$IMAGE" "$ALIAS"
fi
version="$(docker run --rm --network host "$IMAGE" python3 --version)"
log "$IMAGE ready ($version)${ALIAS:+, also tagged $ALIAS}"
echo "$IMAGE"
