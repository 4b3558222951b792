#!/usr/bin/env bash
# Make a Docker engine and compose usable on a Debian/Ubuntu machine.
#
# Installs docker.io, docker-compose (v1; only where no `docker compose` v2 plugin
# works) and debootstrap with apt when a command is missing, starts dockerd in the background when no engine answers, and waits
# until `docker info` works.  Idempotent: on a machine that already has a running
# engine it only checks.  Needs root (apt, dockerd).  Used by .ci/run before the
# @pytest.mark.docker tests.
#
#   launch/docker-setup.sh            # install if needed, start, wait (60 s)
#   DOCKERD_LOG=/tmp/dockerd.log      # where a dockerd started here logs
set -euo pipefail

log=${DOCKERD_LOG:-/tmp/dockerd.log}

missing=()
# `docker` alone may be a bare client (some images ship one): the engine is dockerd.
command -v dockerd >/dev/null || missing+=(docker.io)
docker compose version >/dev/null 2>&1 || command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    echo "docker-setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! docker info >/dev/null 2>&1; then
    # No systemd in CI containers: run the daemon directly, detached from this
    # shell so that it outlives the script.
    echo "docker-setup: starting dockerd (log: $log)"
    setsid dockerd >"$log" 2>&1 </dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && break
        sleep 1
    done
fi

if ! docker info >/dev/null 2>&1; then
    echo "docker-setup: the Docker engine did not start within 60 s; see $log" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
fi
if docker compose version >/dev/null 2>&1; then
    compose="docker compose $(docker compose version --short)"
else
    compose="docker-compose $(docker-compose version --short)"
fi
echo "docker-setup: engine $(docker version --format '{{.Server.Version}}'), $compose"
