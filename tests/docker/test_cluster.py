"""The docker-compose cluster, built and used for real: three containers, one rank each.

The session's image fixture (conftest.py) builds everything from scratch: dependency
wheels for the image's Python (cp311, manylinux), the debootstrap base image
(launch/make-base-image.sh), the node image (launch/Dockerfile).  The tests
then run `docker compose up` (or docker-compose, v1) as a user would:

* a short training run across node1..node3 gives, step by step, the losses of
  a single-process run of the same config on the host (relative 1e-5): data
  parallelism over real containers and real TCP changes nothing but speed;
* the narrow BatchNorm CNN with random crops and flips trains across the three
  nodes with the single-process losses too (statistics of the global batch);
* 2 ranks on each of node1 and node2 take the hierarchical path (one parameter
  copy per node in shared memory, parts allreduced between the nodes), with
  the same losses and identical weights on all 4 ranks; 2 ranks on node1 and
  1 on node2 agree to take the plain allreduce (and do not hang);
* killing node3's container mid-run ends the job with an error within 30 s
  (no rank left waiting in an allreduce), and the newest checkpoint on the
  shared run volume still loads (`ddtrain evaluate`);
* with `ddtrain launch --max-restarts`, killing node3 mid-epoch restarts the
  job on node1 and node2 from its newest checkpoint, and it ends with bitwise
  the weights (--deterministic) and the test accuracy of an uninterrupted run,
  having redone at most train.checkpoint_every steps.

Teardown removes every container, network and volume the module made (and the
session the images), also after a failure, and fails if anything is left.  Needs a Docker engine,
docker-compose, root (debootstrap) unless the base image exists, and the real
FashionMNIST; skips without them, fails under CI=true.  Timings of each phase
are printed at the end of the module.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import COMPOSE_FILE, TAG, blank_ddtrain_env, compose_command, compose_down, run

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PROJECT = f"ddtrain-test-{TAG}"
NODES = ("node1", "node2", "node3")

# 10 steps of 96 images (32 per rank); small enough for seconds, long enough
# for every rank to take part in many allreduces.
TRAIN_ARGS = ["--config", "tiny", "--train-samples", "960", "--batch-size", "96", "--seed", "7"]


# ---------------------------------------------------------------- helpers
def step_losses(metrics_jsonl: str) -> tuple[list[int], list[float]]:
    """(steps, losses) of the step records of a metrics.jsonl text, in file order."""
    records = [json.loads(line) for line in metrics_jsonl.splitlines() if line.strip()]
    steps = [r for r in records if r.get("event") == "step"]
    return [r["step"] for r in steps], [r["loss"] for r in steps]


class Cluster:
    """One compose project of the cluster, with the session's image and the real data."""

    def __init__(self, image: str, data_dir: Path):
        # Settings of the caller's shell must not leak into the file (an empty one is unset).
        self.env = {**blank_ddtrain_env(), "DDTRAIN_IMAGE": image, "DDTRAIN_DATA_HOST": str(data_dir)}

    def compose(self, *args: str, timeout: float, check: bool = True,
                env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = [*compose_command(), "-f", str(COMPOSE_FILE), "-p", PROJECT, *args]
        return run(cmd, env={**self.env, **(env or {})}, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        """Id of the service's container (running or stopped)."""
        cid = self.compose("ps", "-a", "-q", service, timeout=60).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def one_off(self, entrypoint: str, *args: str, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess:
        """Run `entrypoint args` in a fresh node2-like container (shared volumes, no sshd)."""
        return self.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", entrypoint, "node2",
                            *args, timeout=timeout, check=check)

    def down(self) -> None:
        compose_down(self.compose, PROJECT)


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(image, data_dir, request) -> Cluster:
    c = Cluster(image, data_dir)
    request.addfinalizer(c.down)
    return c


# ---------------------------------------------------------------- tests
def test_three_node_training_matches_single_process(cluster, data_dir, tmp_path, timings):
    single = tmp_path / "single"
    t0 = time.monotonic()
    run([sys.executable, "-m", "ddtrain", "train", *TRAIN_ARGS, "--epochs", "1",
         "--run-dir", str(single), "--data-dir", str(data_dir)], timeout=300)
    timings["single-process run on the host"] = time.monotonic() - t0
    want_steps, want = step_losses((single / "metrics.jsonl").read_text())
    assert len(want_steps) == 10, want_steps

    t0 = time.monotonic()
    up = cluster.compose("up", "--no-build", "--no-color", "--exit-code-from", "node1", timeout=600, check=False,
                         env={"DDTRAIN_TRAIN_ARGS": " ".join([*TRAIN_ARGS, "--epochs", "1"]),
                              "DDTRAIN_RUN": "same"})
    timings["cluster start + 3-rank training (docker-compose up)"] = time.monotonic() - t0
    log = up.stdout + up.stderr
    assert up.returncode == 0, f"docker-compose up exited with {up.returncode}:\n{log[-6000:]}"

    # node1 logged into the other two over SSH with the cluster key (which rank ran
    # where is checked while the job runs, in the next test).
    for host in NODES[1:]:
        assert re.search(rf"^{host}[_-]1 +\| Accepted publickey for root", log, re.M), log[-6000:]

    metrics = cluster.one_off("cat", "/runs/same/metrics.jsonl").stdout
    start = json.loads(metrics.splitlines()[0])
    assert start["event"] == "start" and start["world_size"] == 3, start
    # one rank per node: nothing to share in a node, so the default is the plain allreduce
    assert start["gradient_sync"] == "MPI allreduce, blocking", start
    # each rank on a different host, as the trainer logs it at start-up
    assert start["hosts"] == list(NODES), start["hosts"]
    placement = re.search(r"ranks: 0@node1 1@node2 2@node3", log)
    assert placement, log[-6000:]
    timings["placement"] = placement.group(0)
    got_steps, got = step_losses(metrics)
    assert got_steps == want_steps
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


# The narrow BatchNorm CNN with crops and flips: 10 steps of 64 images (22/21/21 per rank).
CNN_ARGS = ["--config", "cnn-small", "--train-samples", "640", "--batch-size", "64", "--seed", "7", "--epochs", "1",
            "--set", "data.crop_pad=2", "--set", "data.hflip=true", "--set", "train.log_every=1"]


def test_batchnorm_cnn_across_three_nodes_matches_single_process(cluster, data_dir, tmp_path, timings):
    """BatchNorm's statistics are summed over the containers and each image's crop and flip
    depend only on its index: the CNN trains across three nodes as in one process."""
    single = tmp_path / "single"
    run([sys.executable, "-m", "ddtrain", "train", *CNN_ARGS, "--run-dir", str(single), "--data-dir", str(data_dir)],
        timeout=300)
    want_steps, want = step_losses((single / "metrics.jsonl").read_text())
    assert len(want_steps) == 10, want_steps
    t0 = time.monotonic()
    up = cluster.compose("up", "--no-build", "--no-color", "--exit-code-from", "node1", timeout=600, check=False,
                         env={"DDTRAIN_TRAIN_ARGS": " ".join(CNN_ARGS), "DDTRAIN_RUN": "cnn"})
    timings["cluster start + 3-rank BatchNorm CNN training"] = time.monotonic() - t0
    log = up.stdout + up.stderr
    assert up.returncode == 0, f"docker-compose up exited with {up.returncode}:\n{log[-6000:]}"
    metrics = cluster.one_off("cat", "/runs/cnn/metrics.jsonl").stdout
    start = json.loads(metrics.splitlines()[0])
    assert start["world_size"] == 3 and start["hosts"] == list(NODES), start
    got_steps, got = step_losses(metrics)
    assert got_steps == want_steps
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


def test_two_ranks_on_each_of_two_nodes_share_memory_within_a_node(cluster, data_dir, tmp_path, timings):
    """4 ranks, 2 per node: by default each node keeps one parameter copy in shared memory and
    the ranks' parts are allreduced between the nodes (the hierarchical path); same losses."""
    single = tmp_path / "single"
    run([sys.executable, "-m", "ddtrain", "train", *TRAIN_ARGS, "--epochs", "1",
         "--run-dir", str(single), "--data-dir", str(data_dir)], timeout=300)
    want_steps, want = step_losses((single / "metrics.jsonl").read_text())

    t0 = time.monotonic()
    up = cluster.compose("up", "--no-build", "--no-color", "--exit-code-from", "node1", timeout=600, check=False,
                         env={"DDTRAIN_TRAIN_ARGS": " ".join([*TRAIN_ARGS, "--epochs", "1"]),
                              "DDTRAIN_RUN": "two-by-two", "DDTRAIN_NP": "4",
                              "DDTRAIN_HOSTS": "node1:2,node2:2"})
    timings["cluster start + 2x2-rank training (docker-compose up)"] = time.monotonic() - t0
    log = up.stdout + up.stderr
    assert up.returncode == 0, f"docker-compose up exited with {up.returncode}:\n{log[-6000:]}"
    assert re.search(r"ranks: 0@node1 1@node1 2@node2 3@node2", log), log[-6000:]
    sync = "node shared memory (2 ranks per node), each part allreduced across 2 nodes"
    assert f"gradient sync: {sync}" in log, log[-6000:]

    metrics = cluster.one_off("cat", "/runs/two-by-two/metrics.jsonl").stdout
    start = json.loads(metrics.splitlines()[0])
    assert start["world_size"] == 4 and start["gradient_sync"] == sync, start
    got_steps, got = step_losses(metrics)
    assert got_steps == want_steps
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)
    summary = json.loads(cluster.one_off("cat", "/runs/two-by-two/summary.json").stdout)
    assert len(set(summary["param_sha256_per_rank"])) == 1, summary["param_sha256_per_rank"]


def test_unequal_ranks_per_node_take_the_allreduce(cluster, timings):
    """2 ranks on node1, 1 on node2: shared memory cannot apply (one part per local rank needs
    as many ranks on every node); every rank must decide so together and train, not hang."""
    t0 = time.monotonic()
    up = cluster.compose("up", "--no-build", "--no-color", "--exit-code-from", "node1", timeout=600, check=False,
                         env={"DDTRAIN_TRAIN_ARGS": " ".join([*TRAIN_ARGS, "--epochs", "1"]),
                              "DDTRAIN_RUN": "two-and-one", "DDTRAIN_NP": "3",
                              "DDTRAIN_HOSTS": "node1:2,node2:1"})
    timings["cluster start + 2+1-rank training (docker-compose up)"] = time.monotonic() - t0
    log = up.stdout + up.stderr
    assert up.returncode == 0, f"docker-compose up exited with {up.returncode}:\n{log[-6000:]}"
    assert re.search(r"ranks: 0@node1 1@node1 2@node2", log), log[-6000:]
    assert "gradient sync: MPI allreduce, blocking" in log, log[-6000:]


def test_killed_node_ends_job_and_last_checkpoint_loads(cluster, timings):
    # Far more epochs than the test waits for: the job can only end by the kill.
    t0 = time.monotonic()
    cluster.compose("up", "--no-build", "--detach", timeout=300,
                    env={"DDTRAIN_TRAIN_ARGS": " ".join([*TRAIN_ARGS, "--epochs", "1000"]),
                         "DDTRAIN_RUN": "killed"})
    # node1 is created only once node2 and node3 are healthy (sshd up).
    timings["cluster start (up --detach)"] = time.monotonic() - t0
    node1, node3 = cluster.container("node1"), cluster.container("node3")

    deadline = time.monotonic() + 180
    while True:
        ls = cluster.compose("exec", "-T", "node2", "ls", "/runs/killed/checkpoints",
                             timeout=60, check=False)
        if ls.returncode == 0 and ls.stdout.split():
            break
        state = run(["docker", "inspect", "-f", "{{.State.Running}}", node1], timeout=60).stdout.strip()
        assert state == "true", "node1 ended before its first checkpoint:\n" + \
            run(["docker", "logs", node1], timeout=60).stdout[-4000:]
        assert time.monotonic() < deadline, "no checkpoint on the run volume after 180 s"
        time.sleep(0.5)

    # One rank process in each container: the job really spans three hosts.
    for service in NODES:
        cid = cluster.container(service)
        procs = run(["docker", "top", cid, "-eo", "pid,args"], timeout=60).stdout.splitlines()[1:]
        ranks = [p for p in procs if p.split()[2:5] == ["-m", "ddtrain", "train"]]
        assert len(ranks) == 1, f"{service} runs {len(ranks)} ranks:\n" + "\n".join(procs)

    t0 = time.monotonic()
    run(["docker", "kill", node3], timeout=60)
    try:
        status = int(run(["docker", "wait", node1], timeout=30).stdout.strip())
    except subprocess.TimeoutExpired:
        pytest.fail("the job was still running 30 s after node3's container was killed")
    timings["job end after killing node3"] = time.monotonic() - t0
    logs = run(["docker", "logs", node1], timeout=60)
    assert status != 0, f"node1 exited 0 after node3 was killed:\n{logs.stdout[-4000:]}{logs.stderr[-4000:]}"

    ev = cluster.one_off("ddtrain", "evaluate", "--checkpoint", "/runs/killed", "--device", "cpu", "--json")
    result = json.loads(ev.stdout)
    assert result["checkpoint"].startswith("/runs/killed/checkpoints/"), result
    assert math.isfinite(result["test_loss"]) and 0.0 <= result["test_accuracy"] <= 1.0, result


# Elastic: 400 steps of 96 (4 epochs of 100), a checkpoint every 25 steps, in deterministic mode.
ELASTIC_ARGS = ["--config", "tiny", "--train-samples", "9600", "--batch-size", "96", "--seed", "7", "--epochs", "4",
                "--deterministic", "--set", "train.checkpoint_every=25", "--set", "train.log_every=1",
                "--set", "dist.straggler_ratio=1000"]
CHECKPOINT_EVERY = 25


def last_step(container: str, run_dir: str) -> int:
    """The newest step record of RUN_DIR/metrics.jsonl in a running container (0 if none yet)."""
    tail = run(["docker", "exec", container, "tail", "-n", "3", f"{run_dir}/metrics.jsonl"], check=False,
               timeout=30).stdout
    steps = [0]
    for line in tail.splitlines():
        try:
            steps.append(json.loads(line).get("step") or 0)
        except ValueError:
            pass  # the line being written
    return max(steps)


def test_killed_node_is_dropped_and_the_job_finishes_on_the_others(cluster, data_dir, tmp_path, timings):
    """`ddtrain launch --max-restarts 2 --min-ranks 2`: node3 is killed mid-epoch; the job restarts on
    node1 and node2 from its newest checkpoint and ends with the uninterrupted run's weights, bit for bit."""
    single = tmp_path / "single"
    run([sys.executable, "-m", "ddtrain", "train", *ELASTIC_ARGS, "--run-dir", str(single),
         "--data-dir", str(data_dir)], timeout=300)
    want = json.loads((single / "summary.json").read_text())

    cluster.compose("up", "--no-build", "--detach", timeout=300,
                    env={"DDTRAIN_TRAIN_ARGS": " ".join(ELASTIC_ARGS), "DDTRAIN_RUN": "elastic",
                         "DDTRAIN_LAUNCH_ARGS": "--max-restarts 2 --min-ranks 2"})
    node1, node3 = cluster.container("node1"), cluster.container("node3")
    deadline = time.monotonic() + 120
    while (step := last_step(node1, "/runs/elastic")) < 2 * CHECKPOINT_EVERY + 10:
        assert time.monotonic() < deadline, "the job did not reach step 60 in 120 s"
        time.sleep(0.05)
    t0 = time.monotonic()
    run(["docker", "kill", node3], timeout=60)
    timings["elastic: node3 killed at step"] = str(step)
    status = int(run(["docker", "wait", node1], timeout=240).stdout.strip())
    timings["elastic: kill to the end of the job on 2 nodes"] = time.monotonic() - t0
    log = run(["docker", "logs", node1], timeout=60)
    text = log.stdout + log.stderr
    assert status == 0, text[-6000:]
    assert "# ddtrain launch: node3 does not answer" in text, text[-6000:]
    assert "node3 dropped; restart 1 of 2 on 2 rank(s) (node1:1,node2:1)" in text, text[-6000:]
    assert re.search(r"ranks: 0@node1 1@node2 \(pids", text), text[-6000:]

    metrics = cluster.one_off("cat", "/runs/elastic/metrics.jsonl").stdout
    (restart,) = [r for r in map(json.loads, metrics.splitlines()) if r["event"] == "restart"]
    assert restart["dropped_hosts"] == ["node3"] and restart["ranks"] == 2, restart
    assert restart["steps_redone"] <= CHECKPOINT_EVERY, restart
    timings["elastic: steps redone"] = str(restart["steps_redone"])
    timings["elastic: failure to restart (probes)"] = restart["seconds_to_restart"]
    got = json.loads(cluster.one_off("cat", "/runs/elastic/summary.json").stdout)
    assert got["world_size"] == 2, got
    assert got["param_sha256"] == want["param_sha256"], (got["param_sha256"], want["param_sha256"])
    assert got["test_accuracy"] == want["test_accuracy"]
    cluster.compose("rm", "--force", "--stop", timeout=120)  # the next test starts a fresh cluster
