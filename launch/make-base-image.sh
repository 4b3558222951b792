#!/usr/bin/env bash
# Build a local Debian base image for launch/Dockerfile without a registry.
#
#   launch/make-base-image.sh [IMAGE]        # default IMAGE: ddtrain-base:bookworm
#   docker build --build-arg BASE_IMAGE=ddtrain-base:bookworm -f launch/Dockerfile .
#
# For machines that reach a Debian mirror but no container registry (so
# `FROM python:3.11-slim` cannot be pulled).  The image is a debootstrap
# minbase of Debian bookworm (Python 3.11, the same ABI as the official
# python:3.11 images, so the same cp311 wheels install in both) with
# python3-venv and OpenSSH, imported with `docker import`.  SSH host keys are
# removed: every container makes its own at start (launch/entrypoint.sh).
#
# Idempotent and fast on repeat: nothing is done when IMAGE exists; the root
# file system tarball is cached (DDTRAIN_CACHE_DIR, default ~/.cache/ddtrain),
# so re-creating a deleted image is one `docker import` (seconds) instead of a
# debootstrap (about a minute).  Needs root (debootstrap, chroot).
#
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian),
# DDTRAIN_CACHE_DIR.
set -euo pipefail

image=${1:-ddtrain-base:bookworm}
suite=bookworm
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cache_dir=${DDTRAIN_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ddtrain}
tarball=$cache_dir/rootfs-$suite-minbase-python3-ssh.tar
packages=python3,python3-venv,openssh-server,openssh-client

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "make-base-image: $image exists, nothing to do"
    exit 0
fi

if [[ ! -s $tarball ]]; then
    command -v debootstrap >/dev/null || {
        echo "make-base-image: debootstrap is missing; run launch/docker-setup.sh or apt-get install debootstrap" >&2
        exit 1
    }
    mkdir -p "$cache_dir"
    rootfs=$(mktemp -d "$cache_dir/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    echo "make-base-image: debootstrap $suite from $mirror (about a minute)"
    debootstrap --variant=minbase --include="$packages" "$suite" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || {
        tail -n 20 "$rootfs.log" >&2
        echo "make-base-image: debootstrap failed; full log: $rootfs.log" >&2
        exit 1
    }
    rm -f "$rootfs.log"
    # Host keys made by the openssh-server postinst would be shared by every
    # container built from this image; package caches and docs are dead weight.
    rm -rf "$rootfs"/etc/ssh/ssh_host_*_key* "$rootfs"/var/cache/apt/archives/*.deb \
        "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc "$rootfs"/usr/share/man \
        "$rootfs"/usr/share/locale
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi

echo "make-base-image: importing $tarball as $image"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    "$tarball" "$image" >/dev/null
echo "make-base-image: $image ready"
