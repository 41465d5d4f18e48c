#!/usr/bin/env bash
# Makes the base image the Docker runtime's tests build on,
# berth-test-base:latest, without a registry: a root filesystem holding
# Debian's static busybox (and its applets as symlinks: sh, sleep, nc, wget,
# httpd, ...) turned into an image with `docker import`. Idempotent: an
# existing image is left alone (FORCE=1 rebuilds it).
set -euo pipefail

IMAGE="${BERTH_TEST_IMAGE:-berth-test-base:latest}"

log() { printf '== %s\n' "$*" >&2; }

if ! command -v docker >/dev/null 2>&1; then
    echo "test-image: the docker CLI is not installed" >&2
    exit 1
fi
if ! docker version --format '{{.Server.Version}}' >/dev/null 2>&1; then
    echo "test-image: no Docker engine answers (${DOCKER_HOST:-unix:///var/run/docker.sock})" >&2
    exit 1
fi

# Test processes run this in parallel; one makes the image, the others wait
# for it and then find it.
exec 9>"${TMPDIR:-/tmp}/berth-test-image.lock"
flock 9

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE already exists"
    exit 0
fi

# Debian's busybox-static installs a statically linked /bin/busybox, so the
# image needs no libc.
BUSYBOX=/bin/busybox
if ! dpkg -s busybox-static >/dev/null 2>&1; then
    log "installing busybox-static"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y busybox-static >/dev/null 2>&1 || {
        apt-get update >/dev/null
        apt-get install -y busybox-static >/dev/null
    }
fi
if ! [[ -x "$BUSYBOX" ]]; then
    echo "test-image: busybox-static is installed but $BUSYBOX is missing" >&2
    exit 1
fi

ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,proc,sys,dev,root,var/www}
chmod 1777 "$ROOTFS/tmp"
cp "$BUSYBOX" "$ROOTFS/bin/busybox"
# --install runs inside the rootfs (chroot, as root) so the applets land in
# their usual directories; without chroot they all go to /bin. Either way
# the symlinks point at /bin/busybox, where the container has it.
chroot "$ROOTFS" /bin/busybox --install -s 2>/dev/null ||
    "$BUSYBOX" --install -s "$ROOTFS/bin"
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$ROOTFS/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$ROOTFS/etc/group"

log "importing $IMAGE"
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["sh"]' \
    - "$IMAGE" >/dev/null
docker image inspect "$IMAGE" --format "{{.Id}} $IMAGE" >&2
