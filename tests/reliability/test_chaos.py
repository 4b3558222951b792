"""Faults during training, with real processes: killed, stopped and failing ranks, NaN, divergence.

A fault must end the whole job quickly (within 30 s), non-zero, naming the rank, leaving
no process behind; the checkpoints it leaves must resume on another rank count to the same
training as an uninterrupted run; no checkpoint may hold non-finite weights.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import numpy as np
import pytest

from ddtrain.train.checkpoint import find_resume_checkpoint, list_checkpoints, load_checkpoint
from tests.reliability.conftest import (BASE, LONG_EPOCHS, assert_same_losses, orphans, rank_pids, summary,
                                        wait_for_step)

pytestmark = pytest.mark.mpi  # every test here runs a job under mpiexec

DEADLINE = 30.0  # seconds in which a fault must end the job (the promise: no hangs)


def assert_ended_cleanly(run, marker: str) -> None:
    """Non-zero, within DEADLINE, no Python traceback, and no process of the job left."""
    assert run.rc not in (0, None), run
    assert run.seconds < DEADLINE, run
    assert "Traceback" not in run.text, run
    assert orphans(marker) == [], f"processes left behind: {orphans(marker, 0)}"


def test_killed_rank_ends_the_job_and_its_checkpoint_resumes_on_two_ranks_and_one(mpi, reference, tmp_path):
    run = tmp_path / "run"
    r = mpi.train(run, "--set", "train.checkpoint_every=3", "--chaos", "kill:1:11", n=3)
    assert_ended_cleanly(r, mpi.marker)
    assert re.search(r"rank 1: chaos: kill at step 11 \(pid (\d+)", r.text), r
    on_one = tmp_path / "run-then-1"
    shutil.copytree(run, on_one)
    for where, n in ((run, 2), (on_one, None)):
        done = mpi.ok(where, "--set", "train.checkpoint_every=3", "--resume", "auto", n=n)
        assert "resumed from" in done.out and "step-00000009: step 9" in done.out, done
        assert f"saved by 3 rank(s), now {n or 1}" in done.out, done
        assert_same_losses(where, reference)
    # Final weights: within float32 summation-order noise of the uninterrupted run's.
    a = load_checkpoint(run / "checkpoints" / "step-00000016").model
    b = load_checkpoint(reference / "checkpoints" / "step-00000016").model
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5)


def test_rank_killed_from_outside_mid_epoch(mpi, long_reference, tmp_path):
    """A real `kill -9` of rank 2 while the job trains: hydra ends the job and names its pid,
    which ddtrain's start-up line maps to the rank; the job resumes on 2 ranks."""
    run = tmp_path / "run"
    args = ("--epochs", LONG_EPOCHS, "--set", "train.checkpoint_every=5")
    proc = mpi.start(["train", *BASE, "--run-dir", run, *args], n=3)
    wait_for_step(run, 60, proc)
    victim = rank_pids(mpi.marker)[2]
    t0 = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    r = mpi.wait(proc, timeout=60, started=t0)
    assert_ended_cleanly(r, mpi.marker)
    pids = re.search(r"ranks: 0@\S+ 1@\S+ 2@\S+ \(pids (\d+) (\d+) (\d+)\)", r.out)  # the start-up line
    assert pids and int(pids.group(3)) == victim, r
    named = re.search(r"PID (\d+) RUNNING AT", r.text)  # hydra's report: a pid, which that line maps to a rank
    assert named and named.group(1) in pids.groups(), r
    done = mpi.ok(run, *args, "--resume", "auto", n=2)
    assert "saved by 3 rank(s), now 2" in done.out, done
    assert_same_losses(run, long_reference)


def test_stopped_rank_is_named_by_the_watchdog(mpi, tmp_path):
    run = tmp_path / "run"
    r = mpi.train(run, "--timeout", "5", "--chaos", "stop:1:11", n=3)
    assert_ended_cleanly(r, mpi.marker)  # also: the SIGSTOPped rank was killed, not left stopped
    pid = re.search(r"rank 1: chaos: stop at step 11 \(pid (\d+)", r.text).group(1)
    assert re.search(rf"rank 0: watchdog: rank 1 \(host \S+, pid {pid}\) stopped responding at step 1[01]",
                     r.text), r
    assert find_resume_checkpoint(run / "checkpoints", warn=print).step == 8  # the last one still loads


def test_exception_on_one_rank_aborts_the_job(mpi, tmp_path):
    r = mpi.train(tmp_path / "run", "--chaos", "raise:2:11", n=3)
    assert_ended_cleanly(r, mpi.marker)
    assert r.seconds < 15, r
    assert "rank 2: RuntimeError: chaos: injected failure at step 11" in r.err, r


def test_diverged_rank_is_named_by_the_fingerprint_check(mpi, tmp_path):
    """Rank 0's weights drift at step 5; the check every 4 steps names it at step 8 (the
    majority decides, so the odd one out is named even when it is rank 0). Ranks on one node
    share one parameter copy by default, so this runs the allreduce path, where each rank
    holds its own (as ranks on different nodes do)."""
    run = tmp_path / "run"
    r = mpi.train(run, "--chaos", "diverge:0:5", "--set", "dist.fingerprint_every=4",
                  "--set", "dist.shared_memory=false", n=3)
    assert_ended_cleanly(r, mpi.marker)
    assert "weights diverged at step 8: rank(s) 0 differ from the other 2 ranks; stopping" in r.err, r
    assert not (run / "checkpoints").exists() or list_checkpoints(run / "checkpoints") == []  # none after it


def test_no_divergence_no_false_alarm(mpi, tmp_path):
    """The same check every step of a healthy 3-rank run never fires."""
    run = tmp_path / "run"
    mpi.ok(run, "--set", "dist.fingerprint_every=1", "--set", "dist.shared_memory=false", n=3)
    assert len(set(summary(run)["param_sha256_per_rank"])) == 1
