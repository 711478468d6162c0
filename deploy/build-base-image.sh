#!/usr/bin/env bash
# Build a local Debian bookworm base image with python3, pip and venv, for
# machines that cannot pull python:3.11-slim from a registry.
#
# The root file system comes from debootstrap (Debian's package mirror is
# the only thing it downloads) and is loaded with `docker import`. An image
# that already exists under the requested name is reused, so running this
# again is cheap; pass --rebuild to replace it.
#
# Usage: deploy/build-base-image.sh [--rebuild] [IMAGE]
#   IMAGE          name:tag to create (default raftmq-base:bookworm)
#   DEBIAN_MIRROR  mirror for debootstrap (default http://deb.debian.org/debian)
# Needs root (debootstrap chroots) and the debootstrap package.
set -euo pipefail

rebuild=0
if [[ "${1:-}" == "--rebuild" ]]; then
    rebuild=1
    shift
fi
image="${1:-raftmq-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
suite=bookworm
packages=python3,python3-pip,python3-venv,ca-certificates

log() {
    echo "build-base-image: $*" >&2
}

if ! command -v docker >/dev/null 2>&1; then
    log "error: docker not found; install Docker Engine first"
    exit 1
fi

# Without the lock, two builds at once (two test runs, say) would each run
# debootstrap. The second one waits here and then finds the image.
lock_file=/tmp/raftmq-build-base-image.lock
exec 9>"$lock_file"
if ! flock --nonblock 9; then
    log "another build holds $lock_file; waiting for it"
    flock 9
fi

if [[ $rebuild == 0 ]] && docker image inspect "$image" >/dev/null 2>&1; then
    log "image $image already exists; reusing it (pass --rebuild to replace it)"
    exit 0
fi

if [[ $(id -u) != 0 ]]; then
    log "error: debootstrap needs root; run this script as root"
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    log "error: debootstrap not found; install it with: apt-get install -y debootstrap"
    exit 1
fi

work_dir=$(mktemp -d /var/tmp/raftmq-base-image.XXXXXX)
root_dir="$work_dir/root"
cleanup() {
    # debootstrap mounts /proc and /sys in the target while it runs. An
    # interrupted run can leave them mounted, and rm must not descend there.
    for mount_point in "$root_dir/proc" "$root_dir/sys" "$root_dir/dev/pts"; do
        if mountpoint -q "$mount_point" 2>/dev/null; then
            umount -l "$mount_point" || true
        fi
    done
    rm -rf --one-file-system "$work_dir"
}
trap cleanup EXIT

started=$SECONDS
log "step 1/3: debootstrap $suite ($packages) from $mirror into $root_dir"
debootstrap --variant=minbase --include="$packages" "$suite" "$root_dir" "$mirror"
log "debootstrap finished after $((SECONDS - started)) s"

log "step 2/3: removing package caches and lists from the root file system"
rm -rf "$root_dir"/var/cache/apt/archives/*.deb "$root_dir"/var/lib/apt/lists/* \
    "$root_dir"/var/log/*.log "$root_dir"/var/cache/debconf/*-old

log "step 3/3: importing the root file system as $image"
tar -C "$root_dir" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'LABEL org.opencontainers.image.description="Debian bookworm minbase with python3, pip and venv, made by deploy/build-base-image.sh"' \
    --change 'CMD ["/bin/bash"]' \
    - "$image" >/dev/null
docker run --rm "$image" python3 -c 'import sys, venv, ensurepip; print("python", sys.version.split()[0])' >&2
log "built $image in $((SECONDS - started)) s"
