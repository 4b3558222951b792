"""The Slurm cluster of launch/slurm/docker-compose.yml, built and used for real.

A controller (slurmctld) and three compute nodes (slurmd) of Debian bookworm's Slurm 22.05 and
munge, in containers with Docker's default capabilities on a private network; the munge key is
made at start on an in-memory volume; /shared is the cluster's shared working directory. Jobs
are submitted on the controller as a user would, `sbatch launch/slurm.sbatch ...`:

* ddtrain launch inside the allocation (hydra starts its proxies with srun) trains the tiny
  config across node1..node3 with, step by step, the losses of a single-process run on the host
  (relative 1e-5); Slurm says the job COMPLETED with exit code 0;
* srun starting the ranks itself (`--srun`: srun --mpi=pmi2), 2 ranks on each of 2 nodes: the
  same losses;
* scancel mid-run leaves a valid checkpoint that `ddtrain evaluate` reads;
* with --max-restarts, node3's container killed mid-epoch: the job goes on in the same
  allocation on node1 and node2 (sbatch --no-kill; node3 left out of hydra's host list) from
  the newest checkpoint, and ends with bitwise the weights (--deterministic) and the test
  accuracy of an uninterrupted run, having redone at most train.checkpoint_every steps.

Teardown removes every container, network and volume the module made, also after a failure,
and fails if anything is left (the images go at the end of the session, conftest.py). Needs a
Docker engine, compose, root (debootstrap) unless the base image exists, and the real
FashionMNIST; skips without them, fails under CI=true.
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

from .conftest import SLURM_COMPOSE_FILE, TAG, blank_ddtrain_env, compose_command, compose_down, run

pytestmark = [pytest.mark.docker, pytest.mark.slow]

PROJECT = f"ddtrain-slurm-test-{TAG}"
NODES = ("node1", "node2", "node3")
# 10 steps of 96 images (the same as tests/docker/test_cluster.py).
TRAIN_ARGS = ["--config", "tiny", "--train-samples", "960", "--batch-size", "96", "--seed", "7", "--epochs", "1"]
# Long enough to act on while it trains: 400 steps of 96, a checkpoint every 25, deterministic.
LONG_ARGS = ["--config", "tiny", "--train-samples", "9600", "--batch-size", "96", "--seed", "7", "--epochs", "4",
             "--deterministic", "--set", "train.checkpoint_every=25", "--set", "train.log_every=1",
             "--set", "dist.straggler_ratio=1000"]
CHECKPOINT_EVERY = 25
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL")


def step_losses(metrics_jsonl: str) -> dict[int, float]:
    """{step: loss} of a metrics.jsonl text (later records win, as after a resume)."""
    return {r["step"]: r["loss"] for r in map(json.loads, metrics_jsonl.splitlines()) if r.get("event") == "step"}


def host_run(data_dir: Path, out: Path, args: list[str]) -> Path:
    """The same training in one process on the host: the reference."""
    run([sys.executable, "-m", "ddtrain", "train", *args, "--run-dir", str(out), "--data-dir", str(data_dir)],
        timeout=300)
    return out


class SlurmCluster:
    """One compose project of the Slurm cluster; commands run on the controller in /shared."""

    def __init__(self, image: str, data_dir: Path):
        self.env = {**blank_ddtrain_env(), "DDTRAIN_SLURM_IMAGE": image, "DDTRAIN_DATA_HOST": str(data_dir)}
        self._ids: dict[str, str] = {}

    def compose(self, *args: str, timeout: float, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [*compose_command(), "-f", str(SLURM_COMPOSE_FILE), "-p", PROJECT, *args]
        return run(cmd, env=self.env, timeout=timeout, check=check)

    def up(self) -> float:
        """Start the cluster; seconds until every node is idle in sinfo."""
        t0 = time.monotonic()
        self.compose("up", "--no-build", "--detach", timeout=300)
        deadline = time.monotonic() + 120
        while True:
            states = self.sh("sinfo -h -N -o '%N %t'", check=False).stdout.split("\n")
            if sum(line.split()[1:] == ["idle"] for line in states if line.strip()) == len(NODES):
                return time.monotonic() - t0
            assert time.monotonic() < deadline, f"nodes not idle after 120 s: {states}\n" + \
                self.compose("logs", "--no-color", "--tail", "30", timeout=60, check=False).stdout
            time.sleep(0.2)

    def container(self, service: str) -> str:
        if service not in self._ids:
            cid = self.compose("ps", "-a", "-q", service, timeout=60).stdout.strip()
            assert cid, f"no container for {service}"
            self._ids[service] = cid
        return self._ids[service]

    def sh(self, script: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        """A shell command on the controller, in the shared working directory."""
        return run(["docker", "exec", "-w", "/shared", self.container("controller"), "bash", "-c", script],
                   timeout=timeout, check=check)

    def sbatch(self, *args: str) -> int:
        return int(self.sh("sbatch --parsable " + " ".join(args)).stdout.strip().split(";")[0])

    def job(self, job: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList...); JobState UNKNOWN while
        slurmctld does not answer (it waits up to MessageTimeout for a node that died)."""
        r = self.sh(f"scontrol show job -o {job}", check=False)
        if r.returncode != 0:
            return {"JobState": "UNKNOWN"}
        return dict(item.split("=", 1) for item in r.stdout.split() if "=" in item)

    def wait(self, job: int, timeout: float = 300) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while (info := self.job(job))["JobState"] not in ENDED:
            assert time.monotonic() < deadline, f"job {job} still {info['JobState']} after {timeout} s"
            time.sleep(0.2)
        return info

    def output(self, job: int) -> str:
        return self.sh(f"cat ddtrain-{job}.out", check=False).stdout

    def last_step(self, run_dir: str) -> int:
        steps = [0]
        for line in self.sh(f"tail -n 3 {run_dir}/metrics.jsonl 2>/dev/null", check=False).stdout.splitlines():
            try:
                steps.append(json.loads(line).get("step") or 0)
            except ValueError:
                pass  # the line being written
        return max(steps)

    def down(self) -> None:
        compose_down(self.compose, PROJECT)


@pytest.fixture(scope="module")
def slurm(slurm_image, data_dir, request, timings) -> SlurmCluster:
    c = SlurmCluster(slurm_image, data_dir)
    request.addfinalizer(c.down)
    timings["slurm cluster start (up to 3 idle nodes)"] = c.up()
    return c


def test_sbatch_trains_across_three_nodes_like_one_process(slurm, data_dir, tmp_path, timings):
    want = step_losses((host_run(data_dir, tmp_path / "single", TRAIN_ARGS) / "metrics.jsonl").read_text())
    assert sorted(want) == list(range(1, 11))
    t0 = time.monotonic()
    job = slurm.sbatch("launch/slurm.sbatch", *TRAIN_ARGS)
    info = slurm.wait(job)
    timings["slurm: sbatch to COMPLETED, ddtrain launch (mpiexec + srun), 3 nodes"] = time.monotonic() - t0
    out = slurm.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-4000:]
    assert info["NodeList"] == "node[1-3]", info
    assert f"# Slurm job {job}: hosts node1:1,node2:1,node3:1 from the allocation" in out, out[-4000:]
    assert "-launcher slurm -hosts node1:1,node2:1,node3:1" in out, out[-4000:]
    assert re.search(r"ranks: 0@node1 1@node2 2@node3", out), out[-4000:]
    # the job completion log and squeue agree: it is over, and it completed
    assert re.search(rf"JobId={job} .*JobState=COMPLETED", slurm.sh("cat /var/log/slurm/jobs.log").stdout)
    assert str(job) not in slurm.sh("squeue -h -o %i").stdout.split()
    got = step_losses(slurm.sh(f"cat runs/slurm-{job}/metrics.jsonl").stdout)
    assert sorted(got) == sorted(want)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5, atol=0)


def test_srun_starts_the_ranks_itself_two_per_node(slurm, data_dir, tmp_path, timings):
    """srun --mpi=pmi2 (no mpiexec), 2 ranks on each of 2 nodes: one parameter copy per node in
    shared memory (ranks in one container: MPICH's CMA off, as the compose file sets)."""
    want = step_losses((host_run(data_dir, tmp_path / "single", TRAIN_ARGS) / "metrics.jsonl").read_text())
    t0 = time.monotonic()
    job = slurm.sbatch("--nodes=2", "--ntasks-per-node=2", "launch/slurm.sbatch", "--srun", "--", *TRAIN_ARGS)
    info = slurm.wait(job)
    timings["slurm: sbatch to COMPLETED, srun --mpi=pmi2, 2x2 ranks"] = time.monotonic() - t0
    out = slurm.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-4000:]
    assert "mpiexec" not in out, out[-4000:]
    assert re.search(r"ranks: 0@node1 1@node1 2@node2 3@node2", out), out[-4000:]
    assert "gradient sync: node shared memory (2 ranks per node)" in out, out[-4000:]
    got = step_losses(slurm.sh(f"cat runs/slurm-{job}/metrics.jsonl").stdout)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-5, atol=0)


def test_scancel_mid_run_leaves_a_checkpoint_that_evaluate_reads(slurm, timings):
    job = slurm.sbatch("launch/slurm.sbatch", *LONG_ARGS, "--epochs", "1000")
    deadline = time.monotonic() + 120
    while slurm.last_step(f"runs/slurm-{job}") < CHECKPOINT_EVERY + 5:
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] not in ENDED, slurm.output(job)[-4000:]
        time.sleep(0.1)
    t0 = time.monotonic()
    slurm.sh(f"scancel {job}")
    info = slurm.wait(job, timeout=60)
    timings["slurm: scancel to CANCELLED"] = time.monotonic() - t0
    assert info["JobState"] == "CANCELLED", info
    ev = json.loads(slurm.sh(f"ddtrain evaluate --checkpoint runs/slurm-{job} --device cpu --json").stdout)
    assert ev["checkpoint"].startswith(f"runs/slurm-{job}/checkpoints/step-"), ev
    assert math.isfinite(ev["test_loss"]) and 0.0 <= ev["test_accuracy"] <= 1.0, ev


def test_stalled_rank_is_restarted_and_a_config_error_is_not(slurm, data_dir, tmp_path, timings):
    """A rank SIGSTOPped at step 8 (`--chaos stop:1:8`): the watchdog ends the job, every node
    answers, the job restarts on all three from step 5 (no --chaos) and ends with the weights of
    an uninterrupted run. Then a config error (exit 2): not retried."""
    args = [*TRAIN_ARGS, "--epochs", "2", "--deterministic", "--set", "train.checkpoint_every=5"]
    want = json.loads((host_run(data_dir, tmp_path / "single", args) / "summary.json").read_text())
    t0 = time.monotonic()
    job = slurm.sbatch("launch/slurm.sbatch", "--max-restarts", "1", "--", *args, "--timeout", "4",
                       "--chaos", "stop:1:8")
    info = slurm.wait(job)
    timings["slurm: stalled rank, sbatch to COMPLETED after a restart"] = time.monotonic() - t0
    out = slurm.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-6000:]
    assert re.search(r"watchdog: rank 1 \(host node2, pid \d+\) stopped responding at step 8", out), out[-6000:]
    assert "restart 1 of 1 on 3 rank(s) (node1:1,node2:1,node3:1)" in out, out[-6000:]
    assert "does not answer" not in out, out[-6000:]
    records = [json.loads(line) for line in slurm.sh(f"cat runs/slurm-{job}/metrics.jsonl").stdout.splitlines()]
    (restart,) = [r for r in records if r["event"] == "restart"]
    assert restart["checkpoint_step"] == 5 and restart["steps_redone"] <= 5, restart
    timings["slurm stall: steps redone"] = str(restart["steps_redone"])
    timings["slurm stall: failure to restart (probes)"] = restart["seconds_to_restart"]
    got = json.loads(slurm.sh(f"cat runs/slurm-{job}/summary.json").stdout)
    assert (got["param_sha256"], got["test_accuracy"]) == (want["param_sha256"], want["test_accuracy"])

    job = slurm.sbatch("launch/slurm.sbatch", "--max-restarts", "3", "--", *TRAIN_ARGS, "--set", "train.epochz=1")
    info = slurm.wait(job)
    out = slurm.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), out[-4000:]
    assert "exit code 2 is a usage or config error (the command must change); not restarted" in out, out[-4000:]
    assert out.count("+ ") == 1, out[-4000:]  # one mpiexec: nothing restarted


def test_killed_node_is_left_out_and_the_job_finishes_in_its_allocation(slurm, data_dir, tmp_path, timings):
    """Last in the module: node3 stays dead."""
    want = json.loads((host_run(data_dir, tmp_path / "single", LONG_ARGS) / "summary.json").read_text())
    job = slurm.sbatch("launch/slurm.sbatch", "--max-restarts", "2", "--min-ranks", "2", "--", *LONG_ARGS)
    run_dir = f"runs/slurm-{job}"
    deadline = time.monotonic() + 120
    while (step := slurm.last_step(run_dir)) < 2 * CHECKPOINT_EVERY + 10:
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] not in ENDED, slurm.output(job)[-4000:]
        time.sleep(0.05)
    t0 = time.monotonic()
    run(["docker", "kill", slurm.container("node3")], timeout=60)
    timings["slurm elastic: node3 killed at step"] = str(step)
    info = slurm.wait(job, timeout=300)
    timings["slurm elastic: kill to COMPLETED on 2 nodes"] = time.monotonic() - t0
    out = slurm.output(job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), out[-6000:]
    assert "# ddtrain launch: node3 does not answer" in out, out[-6000:]
    assert "node3 dropped; restart 1 of 2 on 2 rank(s) (node1:1,node2:1)" in out, out[-6000:]
    assert "-launcher slurm -hosts node1:1,node2:1" in out, out[-6000:]
    records = [json.loads(line) for line in slurm.sh(f"cat {run_dir}/metrics.jsonl").stdout.splitlines()]
    (restart,) = [r for r in records if r["event"] == "restart"]
    assert restart["dropped_hosts"] == ["node3"] and restart["ranks"] == 2, restart
    assert restart["steps_redone"] <= CHECKPOINT_EVERY, restart
    timings["slurm elastic: steps redone"] = str(restart["steps_redone"])
    timings["slurm elastic: failure to restart (probes)"] = restart["seconds_to_restart"]
    got = json.loads(slurm.sh(f"cat {run_dir}/summary.json").stdout)
    assert got["world_size"] == 2, got
    assert got["param_sha256"] == want["param_sha256"], (got["param_sha256"], want["param_sha256"])
    assert got["test_accuracy"] == want["test_accuracy"]
