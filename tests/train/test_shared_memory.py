"""`dist.shared_memory`: the node-shared-memory step (ddtrain.parallel.shm) inside the real trainer.

Real `ddtrain train` jobs under mpiexec on the real dataset. The sharded step is the same
training as one process, summed in another order: 2 and 3 ranks must give every step's loss
within 1e-5 (relative) of one process, the same test accuracy, and the same weights on every
rank. Its checkpoints hold the whole optimizer state (gathered from the ranks' parts), so
they resume on one process, and a one-process checkpoint resumes in shared-memory mode. A
non-finite gradient on one rank stops every rank with one message; the options it cannot
work with are refused with exit 2; a node sync that never completes is named by the watchdog.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import PYTHON, REPO, ddtrain, mpiexec, step_losses, summary

# As tests/train/test_equivalence.py: 1021 samples, global batch 60 -> 18 steps an epoch, the
# last a single sample (so ranks with an empty slice contribute an all-zero gradient slot).
COMMON = ["--config", "tiny", "--epochs", "2", "--train-samples", "1021", "--batch-size", "60",
          "--set", "train.log_every=1", "--threads", "1", "--set", "dist.straggler_ratio=1000"]
SHM = ["--set", "dist.shared_memory=true"]
# A checkpoint every 4 steps, and a failure at step 23 (epoch 2): the newest checkpoint is
# step 20, mid-epoch 2, momentum buffers and all.
INTERRUPTED = ["--set", "train.checkpoint_every=4", "--chaos", "raise:{rank}:23"]
RESUMED_AT = "step 20, epoch 2 batch 2"

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, the same options: the run every shared-memory run must reproduce."""
    d = tmp_path_factory.mktemp("one")
    p = ddtrain(["train", *COMMON, "--run-dir", str(d)])
    assert p.returncode == 0, p.stdout + p.stderr
    return d


@pytest.fixture(scope="module")
def shm_runs(tmp_path_factory):
    """2 ranks with the default (auto: shared memory on one node), 3 ranks asking for it."""
    out = {}
    for n, options in ((2, []), (3, SHM)):
        d = tmp_path_factory.mktemp(f"shm{n}")
        p = ddtrain(["train", *COMMON, *options, "--run-dir", str(d)], ranks=n)
        assert p.returncode == 0, p.stdout + p.stderr
        assert p.stdout.count(f"gradient sync: node shared memory ({n} ranks on one node)") == 1, p.stdout
        out[n] = d
    return out


def assert_same_losses(run, reference):
    one, many = step_losses(reference), step_losses(run)
    assert len(one) == 2 * 18 and sorted(one) == sorted(many)
    for step, loss in one.items():
        assert many[step] == pytest.approx(loss, rel=1e-5), f"step {step}"


@pytest.mark.parametrize("n", [2, 3])
def test_per_step_losses_match_one_process(reference, shm_runs, n):
    assert_same_losses(shm_runs[n], reference)


@pytest.mark.parametrize("n", [2, 3])
def test_same_test_accuracy_and_identical_weights_on_every_rank(reference, shm_runs, n):
    s1, sn = summary(reference), summary(shm_runs[n])
    assert sn["world_size"] == n and sn["gradient_sync"].startswith("node shared memory")
    assert sn["test_accuracy"] == pytest.approx(s1["test_accuracy"], abs=1e-4)
    assert len(set(sn["param_sha256_per_rank"])) == 1, sn["param_sha256_per_rank"]


def interrupted(run, ranks, *extra):
    p = ddtrain(["train", *COMMON, *extra, *[a.format(rank=ranks - 1) for a in INTERRUPTED],
                 "--run-dir", str(run)], ranks=ranks)
    assert p.returncode != 0 and "chaos: raise at step 23" in p.stderr, p.stdout + p.stderr
    assert (run / "checkpoints" / "step-00000020").is_dir(), sorted((run / "checkpoints").iterdir())


def resume(run, ranks, saved_by, *extra):
    p = ddtrain(["train", *COMMON, *extra, "--resume", "auto", "--run-dir", str(run)], ranks=ranks)
    assert p.returncode == 0, p.stdout + p.stderr
    assert RESUMED_AT in p.stdout and f"saved by {saved_by} rank(s), now {ranks}" in p.stdout, p.stdout


def test_checkpoint_on_two_ranks_resumes_on_one_process(reference, tmp_path):
    run = tmp_path / "run"
    interrupted(run, 2, *SHM)
    resume(run, 1, 2, *SHM)  # one process: the option has nothing to share and changes nothing
    assert_same_losses(run, reference)
    assert summary(run)["test_accuracy"] == pytest.approx(summary(reference)["test_accuracy"], abs=1e-4)


def test_checkpoint_on_one_process_resumes_on_two_ranks(reference, tmp_path):
    run = tmp_path / "run"
    interrupted(run, 1)
    on_three = tmp_path / "run-then-3"
    shutil.copytree(run, on_three)
    resume(run, 2, 1, *SHM)
    resume(on_three, 3, 1, *SHM)
    for r in (run, on_three):
        assert_same_losses(r, reference)
        assert len(set(summary(r)["param_sha256_per_rank"])) == 1


def test_nan_gradient_on_one_rank_stops_every_rank(tmp_path):
    run = tmp_path / "run"
    p = ddtrain(["train", *COMMON, *SHM, "--chaos", "nan:1:5", "--run-dir", str(run)], ranks=2)
    assert p.returncode == 1 and "Traceback" not in p.stderr, p.stdout + p.stderr
    # every rank sees the flags summed in the reduction: one message, no MPI abort
    assert p.stderr.count("error: non-finite loss or gradient at step 5 (epoch 1)") == 1, p.stderr
    assert "rank 0:" not in p.stderr and "rank 1: error" not in p.stderr, p.stderr
    assert max(step_losses(run)) == 4
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").glob("step-*"))


def test_default_falls_back_to_the_allreduce_where_shared_memory_cannot_apply(tmp_path):
    run = tmp_path / "run"
    p = ddtrain(["train", *COMMON, "--epochs", "1", "--deterministic", "--run-dir", str(run)], ranks=2)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "gradient sync: MPI allreduce, int64 fixed point (deterministic)" in p.stdout, p.stdout
    assert summary(run)["gradient_sync"] == "MPI allreduce, int64 fixed point (deterministic)"


def test_refused_with_deterministic_mode(tmp_path):
    p = ddtrain(["train", *COMMON, *SHM, "--deterministic", "--run-dir", str(tmp_path / "run")], ranks=2)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.count("dist.shared_memory and dist.deterministic exclude each other") == 1, p.stderr


NODE_SYNC_HANG = """
import time
from ddtrain.parallel.mpi import MPICommunicator
comm = MPICommunicator(timeout=2.0)
node = comm.node()
a = node.shared_array((4,), "float32")
comm.set_step(7)
if comm.rank == 0:
    node.node_sync()  # rank 1 never comes: the watchdog must name this call
else:
    time.sleep(30)  # alive (heartbeats go on) but not in the collective
"""


def test_a_node_sync_that_never_completes_hits_the_collective_deadline():
    p = subprocess.run([mpiexec(), "-n", "2", PYTHON, "-c", NODE_SYNC_HANG], capture_output=True, text=True,
                       timeout=60, cwd=REPO)
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    assert "rank 0: watchdog: node_sync at step 7 did not complete within 2 s" in out, out
