"""The docker-compose cluster, built and used for real: three containers, one rank each.

The module fixture builds everything from scratch: dependency wheels for the
image's Python (cp311, manylinux), the debootstrap base image
(launch/make-base-image.sh), the node image (launch/Dockerfile).  The tests
then run `docker-compose up` as a user would:

* a short training run across node1..node3 gives, step by step, the losses of
  a single-process run of the same config on the host (relative 1e-5): data
  parallelism over real containers and real TCP changes nothing but speed;
* 2 ranks on each of node1 and node2 take the hierarchical path (one parameter
  copy per node in shared memory, parts allreduced between the nodes), with
  the same losses and identical weights on all 4 ranks; 2 ranks on node1 and
  1 on node2 agree to take the plain allreduce (and do not hang);
* killing node3's container mid-run ends the job with an error within 30 s
  (no rank left waiting in an allreduce), and the newest checkpoint on the
  shared run volume still loads (`ddtrain evaluate`).

Teardown removes every container, network, volume and image the module made,
also after a failure, and fails if anything is left.  Needs a Docker engine,
docker-compose, root (debootstrap) unless the base image exists, and the real
FashionMNIST; skips without them, fails under CI=true.  Timings of each phase
are printed at the end of the module.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import data_dir as find_real_data

from .conftest import COMPOSE_FILE, REPO, run, skip_or_fail

pytestmark = [pytest.mark.docker, pytest.mark.slow]

TAG = str(os.getpid())
PROJECT = f"ddtrain-test-{TAG}"
IMAGE = f"ddtrain-test:{TAG}"
BASE_IMAGE = "ddtrain-base:bookworm"
WHEELS = REPO / "launch" / "wheels"
NODES = ("node1", "node2", "node3")

# 10 steps of 96 images (32 per rank); small enough for seconds, long enough
# for every rank to take part in many allreduces.
TRAIN_ARGS = ["--config", "tiny", "--train-samples", "960", "--batch-size", "96", "--seed", "7"]


# ---------------------------------------------------------------- helpers
def image_exists(name: str) -> bool:
    return run(["docker", "image", "inspect", name], check=False, timeout=30).returncode == 0


def step_losses(metrics_jsonl: str) -> tuple[list[int], list[float]]:
    """(steps, losses) of the step records of a metrics.jsonl text, in file order."""
    records = [json.loads(line) for line in metrics_jsonl.splitlines() if line.strip()]
    steps = [r for r in records if r.get("event") == "step"]
    return [r["step"] for r in steps], [r["loss"] for r in steps]


def build_wheels() -> None:
    """Wheels of ddtrain's dependencies (and the mpi extra) for CPython 3.11 manylinux x86_64.

    The container cannot reach PyPI, so the host fetches them into launch/wheels/
    (the build context), whatever the host's own Python is.
    """
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["mpi"]
    platforms = [a for p in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
                 for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
         "--dest", str(WHEELS), "--only-binary=:all:", "--implementation", "cp",
         "--python-version", "3.11", "--abi", "cp311", *platforms,
         *requirements, "setuptools>=68", "wheel"], timeout=600)


class Cluster:
    """One docker-compose project of the cluster, with the module's image and the real data."""

    def __init__(self, image: str, data_dir: Path):
        # Settings of the caller's shell must not leak into the file (an empty one is unset).
        blank = {k: "" for k in os.environ if k.startswith("DDTRAIN_")}
        self.env = {**blank, "DDTRAIN_IMAGE": image, "DDTRAIN_DATA_HOST": str(data_dir)}

    def compose(self, *args: str, timeout: float, check: bool = True,
                env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = ["docker-compose", "-f", str(COMPOSE_FILE), "-p", PROJECT, *args]
        return run(cmd, env={**self.env, **(env or {})}, timeout=timeout, check=check)

    def container(self, service: str) -> str:
        """Id of the service's container (running or stopped)."""
        cid = self.compose("ps", "-q", service, timeout=60).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def one_off(self, entrypoint: str, *args: str, timeout: float = 120,
                check: bool = True) -> subprocess.CompletedProcess:
        """Run `entrypoint args` in a fresh node2-like container (shared volumes, no sshd)."""
        return self.compose("run", "--rm", "--no-deps", "-T", "--entrypoint", entrypoint, "node2",
                            *args, timeout=timeout, check=check)

    def leftovers(self) -> list[str]:
        """Containers, networks and volumes of this project that still exist."""
        label = f"label=com.docker.compose.project={PROJECT}"
        found = []
        for kind, ls in (("container", ["ps", "-a"]), ("network", ["network", "ls"]),
                         ("volume", ["volume", "ls"])):
            out = run(["docker", *ls, "-q", "--filter", label], timeout=60).stdout.split()
            found += [f"{kind} {x}" for x in out]
        return found

    def down(self) -> None:
        self.compose("down", "--volumes", "--remove-orphans", "--timeout", "5", timeout=180, check=False)
        left = self.leftovers()
        assert not left, f"docker-compose down left these behind: {left}"


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def timings(request):
    """Seconds per phase, printed (even with output captured) when the module ends."""
    t: dict[str, float | str] = {}
    yield t
    text = "docker cluster timings: " + ", ".join(f"{k} {v:.1f} s" if isinstance(v, float) else f"{k} [{v}]"
                                                  for k, v in t.items())
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\n" + text, flush=True)


@pytest.fixture(scope="module")
def data_dir() -> Path:
    return find_real_data()


@pytest.fixture(scope="module")
def engine() -> None:
    for exe in ("docker", "docker-compose"):
        if shutil.which(exe) is None:
            skip_or_fail(f"{exe} is not installed (launch/docker-setup.sh installs it)")
    if run(["docker", "info"], check=False, timeout=60).returncode != 0:
        skip_or_fail("no Docker engine answers `docker info` (launch/docker-setup.sh starts one)")


def image_ids() -> set[str]:
    return set(run(["docker", "images", "--all", "--quiet", "--no-trunc"], timeout=60).stdout.split())


def remove_new_images(before: set[str]) -> None:
    """Remove the images made since `before` (tagged ones and the untagged layers and build
    stages the legacy builder leaves), newest first so that children go before parents."""
    new = image_ids() - before
    if not new:
        return
    created = run(["docker", "image", "inspect", "--format", "{{.Created}} {{.Id}}", *new],
                  check=False, timeout=60).stdout.split("\n")
    for line in sorted(filter(None, created), reverse=True):
        run(["docker", "rmi", "--force", line.split()[1]], check=False, timeout=120)
    left = image_ids() & new
    assert not left, f"images left behind: {sorted(left)}"


@pytest.fixture(scope="module")
def image(engine, timings, request) -> str:
    """The node image, built offline on the local base image.  At the end, every image made
    here is removed (the base image too when it did not exist before), and the wheels."""
    if not image_exists(BASE_IMAGE) and os.geteuid() != 0:
        skip_or_fail(f"making {BASE_IMAGE} needs root (debootstrap); or make it once with "
                     "`sudo launch/make-base-image.sh`")
    before = image_ids()

    def remove_images():
        # The tag first: a build that hits the cache all the way gives an existing image id.
        run(["docker", "rmi", IMAGE], check=False, timeout=120)
        remove_new_images(before)
    request.addfinalizer(remove_images)
    if not WHEELS.exists():
        request.addfinalizer(lambda: shutil.rmtree(WHEELS, ignore_errors=True))

    t0 = time.monotonic()
    build_wheels()
    timings["wheels"] = time.monotonic() - t0

    t0 = time.monotonic()
    run([str(REPO / "launch" / "make-base-image.sh"), BASE_IMAGE], timeout=900)
    timings["base image"] = time.monotonic() - t0

    t0 = time.monotonic()
    run(["docker", "build", "--quiet", "--file", "launch/Dockerfile",
         "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "--tag", IMAGE, "."], timeout=900)
    timings["image build"] = time.monotonic() - t0
    return IMAGE


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
