#!/usr/bin/env bash
# Entry point of the ddtrain Slurm cluster's containers (launch/slurm/docker-compose.yml).
#
#   ddtrain-slurm-entrypoint controller   munged, then slurmctld (the controller)
#   ddtrain-slurm-entrypoint node         munged, then slurmd; its NodeName is the
#                                         container's hostname (node1..node3)
#   ddtrain-slurm-entrypoint CMD [ARG...] munged, then exec CMD (a one-off client:
#                                         sbatch, squeue, ddtrain evaluate...)
#
# The cluster's munge key is made when the cluster starts, by whichever container
# gets there first (mkdir is atomic), on the volume mounted at $DDTRAIN_MUNGE_DIR
# (default /munge; in-memory in the compose file, so the key never touches a disk
# or an image layer), and copied to /etc/munge/munge.key (mode 0400, owner munge)
# in every container.  /shared is the cluster's shared working directory (a
# volume on every node): the controller puts launch/slurm.sbatch there, jobs
# write their output, run directories and checkpoints there.
#
# /run/ddtrain-slurm-ready appears once the daemon is up (the controller answers
# `scontrol ping`; a node is registered and not down); the compose healthcheck
# waits for it.  Daemon logs go to the container's output.
set -euo pipefail

keydir=${DDTRAIN_MUNGE_DIR:-/munge}
ready=/run/ddtrain-slurm-ready
me=$(hostname -s)

die() { echo "ddtrain-slurm-entrypoint ($me): $*" >&2; exit 1; }

# Wait up to $2 seconds for command $1 to succeed.
wait_until() {
    local i
    for ((i = 0; i < $2 * 5; i++)); do
        eval "$1" >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

rm -f "$ready"
[[ -d $keydir ]] || die "$keydir is not mounted: the cluster's munge key lives there (see launch/slurm/docker-compose.yml)"

if mkdir "$keydir/.keygen" 2>/dev/null; then
    dd if=/dev/urandom of="$keydir/.keygen/munge.key" bs=1024 count=1 status=none
    chmod 0400 "$keydir/.keygen/munge.key"
    mv "$keydir/.keygen/munge.key" "$keydir/munge.key"
fi
wait_until "test -s $keydir/munge.key" 60 ||
    die "no munge key in $keydir after 60 s; the container making it failed (see its log), or remove the volume and start again"
install -o munge -g munge -m 0400 "$keydir/munge.key" /etc/munge/munge.key
install -d -o munge -g munge -m 0755 /run/munge
runuser -u munge -- /usr/sbin/munged || die "munged did not start"
wait_until "munge -n | unmunge" 10 || die "munge does not work (munge -n | unmunge)"

# Run daemon "$@" in the foreground of this script's child, mark ready once
# `$ready_test` succeeds, and stop it on docker stop (PID 1 = docker's init
# forwards SIGTERM here).
serve() {
    local ready_test=$1
    shift
    "$@" &
    local pid=$!
    trap 'kill "$pid" 2>/dev/null' TERM INT
    local i
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$1 exited at start (its message is above)"
        if eval "$ready_test" >/dev/null 2>&1; then
            touch "$ready"
            break
        fi
        sleep 0.2
    done
    [[ -e $ready ]] || die "$1 not ready after 60 s"
    wait "$pid"
}

case ${1:-} in
    controller)
        install -d -o slurm -g slurm /var/lib/slurm/slurmctld /var/log/slurm
        mkdir -p /shared/launch
        install -m 0755 /opt/ddtrain/share/slurm.sbatch /shared/launch/slurm.sbatch
        # slurmctld resolves every node's name at start (and retries for a long
        # time when one does not resolve yet): start it once all the node
        # containers are on the network.
        nodes=$(scontrol show hostnames "$(sed -n 's/^NodeName=\([^ ]*\).*/\1/p' /etc/slurm/slurm.conf | paste -sd,)")
        for node in $nodes; do
            wait_until "getent hosts $node" 60 || die "node $node does not resolve after 60 s (is its container running?)"
        done
        serve "scontrol ping | grep -q 'is UP'" /usr/sbin/slurmctld -D
        ;;
    node)
        install -d /var/lib/slurm/slurmd
        serve "sinfo -h -N -n $me -o %t | grep -qvE 'down|unk|drain|fail|\*'" /usr/sbin/slurmd -D -N "$me"
        ;;
    "")
        die "no role: give controller, node, or a command"
        ;;
    *)
        exec "$@"
        ;;
esac
