#!/usr/bin/env bash
# Entry point of a ddtrain cluster node (launch/Dockerfile, docker-compose.yml).
#
#   ddtrain-entrypoint                 a worker: runs sshd until the container stops
#   ddtrain-entrypoint CMD [ARG...]    sshd in the background, then exec CMD
#                                      (node1: `ddtrain launch ... -- train ...`)
#
# Nodes of one cluster share the directory $DDTRAIN_CLUSTER_DIR (default /cluster;
# in docker-compose.yml a tmpfs volume, so keys never touch a disk and vanish
# when the last node stops).  Without that directory the container is not part
# of a cluster and CMD simply runs.  The shared directory holds:
#
#   id_ed25519, id_ed25519.pub   the cluster's login key: made by whichever node
#                                starts first, trusted (authorized_keys) and used
#                                (ssh client) by every node; key-only root login.
#   known_hosts                  one "HOSTNAME KEY" line per node, appended by each
#                                node for its own freshly made host key, so ssh
#                                checks host keys strictly (no trust on first use).
#
# /run/ddtrain-node-ready appears once this node's sshd accepts connections;
# the compose healthcheck waits for it, so node1 starts its job only when
# every worker can be reached.
set -euo pipefail

cluster=${DDTRAIN_CLUSTER_DIR:-/cluster}
ready=/run/ddtrain-node-ready
me=$(hostname)

if [[ ! -d $cluster ]]; then
    (($#)) || { echo "ddtrain-entrypoint: no command, and $cluster is not mounted (not a cluster node)" >&2; exit 2; }
    exec "$@"
fi

die() { echo "ddtrain-entrypoint ($me): $*" >&2; exit 1; }

# Wait up to $2 seconds for file $1 to exist.
wait_for_file() {
    local i
    for ((i = 0; i < $2 * 10; i++)); do
        [[ -e $1 ]] && return 0
        sleep 0.1
    done
    return 1
}

rm -f "$ready"

# This container's own host key (the image has none, so no two nodes share one).
[[ -e /etc/ssh/ssh_host_ed25519_key ]] || ssh-keygen -q -t ed25519 -N '' -C "$me" -f /etc/ssh/ssh_host_ed25519_key

# The cluster login key: mkdir is atomic, so exactly one node makes it.  The
# .pub file is renamed into place last and marks the pair as complete.
if mkdir "$cluster/.keygen" 2>/dev/null; then
    ssh-keygen -q -t ed25519 -N '' -C "ddtrain-cluster" -f "$cluster/.keygen/id_ed25519"
    mv "$cluster/.keygen/id_ed25519" "$cluster/id_ed25519"
    mv "$cluster/.keygen/id_ed25519.pub" "$cluster/id_ed25519.pub"
fi
wait_for_file "$cluster/id_ed25519.pub" 30 ||
    die "no cluster key in $cluster after 30 s; the node making it failed (see its log), or remove the volume and start again"

install -d -m 700 /root/.ssh
install -m 600 "$cluster/id_ed25519" /root/.ssh/id_ed25519
install -m 644 "$cluster/id_ed25519.pub" /root/.ssh/id_ed25519.pub
install -m 600 "$cluster/id_ed25519.pub" /root/.ssh/authorized_keys

# A single short append is atomic, so nodes starting together do not mix lines.
host_line="$me $(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)"
grep -qxF "$host_line" "$cluster/known_hosts" 2>/dev/null || echo "$host_line" >>"$cluster/known_hosts"

# sshd reads sshd_config.d first and keeps the first value of each option, so
# these override the distribution defaults.  SetEnv gives ssh sessions (hydra's
# proxies) the image's PATH, which sshd would otherwise reset.
cat >/etc/ssh/sshd_config.d/ddtrain.conf <<CONF
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
AuthenticationMethods publickey
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
X11Forwarding no
PrintMotd no
SetEnv PATH=$PATH
CONF

# Client side.  ServerAlive*: a node that disappears (killed container, no TCP
# reset) ends its ssh session within ~10 s, and with it the MPI job, instead of
# leaving the other ranks blocked in an allreduce forever.
cat >/etc/ssh/ssh_config.d/ddtrain.conf <<CONF
Host *
    IdentityFile /root/.ssh/id_ed25519
    GlobalKnownHostsFile $cluster/known_hosts
    UserKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    CheckHostIP no
    BatchMode yes
    ConnectTimeout 10
    ServerAliveInterval 5
    ServerAliveCountMax 2
    LogLevel ERROR
CONF

mkdir -p /run/sshd
/usr/sbin/sshd -D -e &
sshd_pid=$!
# Listening on port 22 (hex 0016, state 0A) per /proc, rather than a test
# connection that sshd would log as a failed login.
listening() { grep -q '^ *[0-9]*: [0-9A-F]*:0016 [0-9A-F]*:0000 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null; }
for ((i = 0; i < 100; i++)); do
    listening && break
    kill -0 "$sshd_pid" 2>/dev/null || die "sshd exited at start (its message is above)"
    sleep 0.1
done
listening || die "sshd does not listen on port 22 after 10 s"
touch "$ready"

if (($# == 0)); then
    # PID 1 ignores SIGTERM unless it traps it: stop promptly on `docker stop`.
    trap 'kill "$sshd_pid"; exit 0' TERM INT
    wait "$sshd_pid"
    exit $?
fi
exec "$@"
