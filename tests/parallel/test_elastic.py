"""Elastic restarts for real on this machine: `ddtrain launch --max-restarts` over the venv's
mpiexec, with faults injected by the chaos drills (the first attempt only: the launcher leaves
--chaos out of restarts).

* a crashed rank (`--chaos kill`): the job is restarted on the same ranks from its newest
  checkpoint and ends with bitwise the weights of an uninterrupted run (--deterministic), and
  within float32 rounding of them (relative 1e-5) without --deterministic;
* a stalled rank (`--chaos stop`, SIGSTOP): the watchdog ends the job, which is restarted;
* a config error (exit 2) is not retried; a failure that repeats is given up after N restarts
  with the job's exit code; SIGTERM to the launcher (docker stop, kill) stops the job with a
  checkpoint (passed on to mpiexec, which forwards it to every rank) and is not retried.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.helpers import PYTHON, REPO, communicate_or_kill, data_dir, mpiexec, summary

pytestmark = pytest.mark.mpi

# 16 steps of 64 (2 epochs of 512 images), a checkpoint every 3 steps.
TRAIN = ["train", "--config", "tiny", "--threads", "1", "--train-samples", "512", "--deterministic",
         "--set", "dist.straggler_ratio=1000", "--set", "train.checkpoint_every=3"]
EVERY = 3


def start(*args) -> subprocess.Popen:
    """`ddtrain launch ARGS` as a user runs it, in a session of its own."""
    mpiexec()  # skips (fails under CI) without MPI
    env = {**os.environ, "DDTRAIN_DATA": str(data_dir()), "PYTHONUNBUFFERED": "1"}
    env.pop("DDTRAIN_DEBUG", None)
    return subprocess.Popen([PYTHON, "-m", "ddtrain", "launch", *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def launch(*args, timeout: float = 180) -> tuple[int | None, str]:
    """(exit status, stdout + stderr) of `ddtrain launch ARGS` run to its end."""
    rc, out, err = communicate_or_kill(start(*args), timeout)
    return rc, out + err


def restarts(run_dir) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("event") == "restart"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: one process (deterministic mode: the same bits on any rank count)."""
    run = tmp_path_factory.mktemp("elastic") / "reference"
    r = subprocess.run([PYTHON, "-m", "ddtrain", *TRAIN, "--run-dir", str(run)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "DDTRAIN_DATA": str(data_dir())})
    assert r.returncode == 0, r.stderr
    return summary(run)


def test_crashed_rank_is_restarted_and_the_weights_are_an_uninterrupted_runs(reference, tmp_path):
    run = tmp_path / "run"
    rc, log = launch("-n", 3, "--max-restarts", 2, "--", *TRAIN, "--run-dir", run, "--chaos", "kill:1:11")
    assert rc == 0, log
    assert "rank 1: chaos: kill at step 11" in log, log
    assert "restart 1 of 2 on 3 rank(s) (this machine)" in log, log
    assert "--chaos kill:1:11 left out (a drill runs on the first attempt only)" in log, log
    (rec,) = restarts(run)
    assert rec["exit_code"] == 9 and rec["ranks"] == 3 and rec["dropped_hosts"] == [], rec
    assert rec["checkpoint_step"] == 9 and rec["checkpoint"].endswith("step-00000009"), rec
    assert rec["steps_redone"] <= EVERY and rec["removed_args"] == ["--chaos kill:1:11"], rec
    done = summary(run)
    assert done["param_sha256"] == reference["param_sha256"]
    assert done["test_accuracy"] == reference["test_accuracy"]


def test_stalled_rank_is_caught_by_the_watchdog_and_restarted(reference, tmp_path):
    run = tmp_path / "run"
    rc, log = launch("-n", 2, "--max-restarts", 1, "--", *TRAIN, "--timeout", "4", "--run-dir", run,
                     "--chaos", "stop:1:5")
    assert rc == 0, log
    assert "watchdog: rank 1" in log and "stopped responding" in log, log
    (rec,) = restarts(run)
    assert rec["exit_code"] == 1 and rec["checkpoint_step"] == 3 and rec["steps_redone"] <= EVERY, rec
    assert summary(run)["param_sha256"] == reference["param_sha256"]


def test_config_error_is_not_retried(tmp_path):
    run = tmp_path / "run"
    rc, log = launch("-n", 2, "--max-restarts", 3, "--", *TRAIN, "--run-dir", run, "--set", "train.epochz=1")
    assert rc == 2, log
    assert "exit code 2 is a usage or config error (the command must change); not restarted" in log, log
    assert log.count("+ ") == 1, log  # one mpiexec command: nothing was restarted


def test_repeating_failure_is_given_up_after_max_restarts(tmp_path):
    # lr 1e30: the first steps' gradients overflow, every attempt stops on the non-finite check
    run = tmp_path / "run"
    rc, log = launch("-n", 2, "--max-restarts", 1, "--", *TRAIN, "--run-dir", run, "--lr", "1e30")
    assert rc == 1, log
    assert "restart 1 of 1" in log and "after 1 restart(s) (--max-restarts 1); giving up; exit code 1" in log, log


def test_restarts_need_a_train_command():
    rc, log = launch("-n", 2, "--max-restarts", 1, "--", "evaluate", "--checkpoint", "x")
    assert rc == 2 and "--max-restarts restarts `train` jobs" in log, log


def test_sigterm_to_the_launcher_stops_the_job_with_a_checkpoint_and_no_restart(tmp_path):
    run = tmp_path / "run"
    proc = start("-n", 2, "--max-restarts", 3, "--", *TRAIN, "--epochs", 200, "--run-dir", run)
    deadline = time.monotonic() + 60
    while not (run / "checkpoints" / "latest").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGTERM)  # the launcher alone, as docker stop or kill PID does
    rc, out, err = communicate_or_kill(proc, 60)
    log = out + err
    assert rc == 143, log
    assert "interrupted by SIGTERM at step" in log, log
    assert "the job was stopped by a signal to the launcher (exit code 143); not restarted" in log, log
    assert not restarts(run) and log.count("+ ") == 1, log


def test_a_crash_before_the_first_checkpoint_starts_over(reference, tmp_path):
    run = tmp_path / "run"
    rc, log = launch("-n", 2, "--max-restarts", 1, "--", *TRAIN, "--run-dir", run, "--chaos", "kill:0:2")
    assert rc == 0, log
    assert "from the start (no checkpoint yet: 1 step(s) redone; the run directory is replaced" in log, log
    lines = log.splitlines()
    after = lines[next(i for i, line in enumerate(lines) if "restart 1 of 1" in line) + 1]
    assert after.startswith("+ ") and after.endswith(" --overwrite"), log  # the restart's command
    assert not (run / "metrics.jsonl").read_text().count('"restart"')  # replaced with the run directory
    assert summary(run)["param_sha256"] == reference["param_sha256"]


def test_without_deterministic_the_weights_are_an_uninterrupted_runs_to_rounding(tmp_path):
    """The default gradient sync (node shared memory, float32 sums in another order than one
    process): after a killed rank and a restart, within relative 1e-5 of an uninterrupted run."""
    from ddtrain.train.checkpoint import load_checkpoint
    fast = [a for a in TRAIN if a != "--deterministic"]
    ref = tmp_path / "reference"
    r = subprocess.run([PYTHON, "-m", "ddtrain", *fast, "--run-dir", str(ref)], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env={**os.environ, "DDTRAIN_DATA": str(data_dir())})
    assert r.returncode == 0, r.stderr
    run = tmp_path / "run"
    rc, log = launch("-n", 3, "--max-restarts", 1, "--", *fast, "--run-dir", run, "--chaos", "kill:1:11")
    assert rc == 0 and "restart 1 of 1" in log, log
    got = load_checkpoint(run / "checkpoints" / "step-00000016").model
    want = load_checkpoint(ref / "checkpoints" / "step-00000016").model
    for name, w in want.items():
        # atol for the few weights near zero, where float32 rounding is large relative to them
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6, err_msg=name)
        assert np.linalg.norm(got[name] - w) <= 1e-5 * np.linalg.norm(w), name
