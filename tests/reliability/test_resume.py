"""Resume anywhere: a run killed mid-epoch continues from its newest checkpoint, on any rank count.

Each scenario kills a real training run with SIGKILL in the middle of epoch 2 (after the
mid-epoch checkpoint of step 9: checkpoint_every=3), resumes it with `--resume auto`, and
compares the result with an uninterrupted single-process run of the same options:
  * the same rank count: bitwise identical final weights (summary.json param_sha256);
  * another rank count: every step's loss within 1e-5 (relative) and the same final test
    accuracy; with --deterministic, bitwise identical weights too.
The SIGKILL of a rank of a 3-rank job, resumed on 2 ranks and on 1, is in test_chaos.py.
"""

from __future__ import annotations

import shutil

import pytest

from tests.reliability.conftest import (EPOCHS, STEPS_PER_EPOCH, assert_same_losses, checkpoint_names,
                                        records, summary)

KILL_AT = 11  # the 11th step, in epoch 2 (8 steps an epoch)
INTERRUPT = ("--set", "train.checkpoint_every=3", "--chaos", f"kill:0:{KILL_AT}")
RESUMED_FROM = "checkpoints/step-00000009"  # the newest checkpoint before step 11: mid-epoch 2


def killed_run(ddtrain, run_dir, *extra, n=None):
    """A run SIGKILLed by chaos at step KILL_AT, its checkpoints left as they were."""
    r = ddtrain.train(run_dir, *INTERRUPT, *extra, n=n)
    assert r.rc not in (0, None), r
    assert f"chaos: kill at step {KILL_AT}" in r.text, r
    assert checkpoint_names(run_dir) == ["latest", "step-00000006", "step-00000008", "step-00000009"]
    return r


def resumed(ddtrain, run_dir, *extra, n=None, saved_by=1):
    r = ddtrain.ok(run_dir, "--resume", "auto", *extra, n=n)
    assert f"resumed from {run_dir / RESUMED_FROM}: step 9, epoch 2 batch 1" in r.out, r
    assert f"saved by {saved_by} rank(s), now {n or 1}" in r.out, r
    return r


def test_same_rank_count_resumes_to_bitwise_identical_weights(ddtrain, reference, tmp_path):
    run = tmp_path / "run"
    killed_run(ddtrain, run)
    resumed(ddtrain, run)
    assert summary(run)["param_sha256"] == summary(reference)["param_sha256"]
    assert summary(run)["test_accuracy"] == summary(reference)["test_accuracy"]
    assert_same_losses(run, reference, rel=0.0)
    # The replayed step (10) was logged twice, with the same loss both times.
    tenth = [r["loss"] for r in records(run, "step") if r["step"] == 10]
    assert len(tenth) == 2 and tenth[0] == tenth[1]


@pytest.mark.mpi
def test_checkpoint_on_one_process_resumes_on_two_ranks(mpi, reference, tmp_path):
    run = tmp_path / "run"
    killed_run(mpi, run)
    resumed(mpi, run, n=2, saved_by=1)
    assert_same_losses(run, reference)
    assert len(set(summary(run)["param_sha256_per_rank"])) == 1


@pytest.mark.mpi
def test_deterministic_checkpoint_on_three_ranks_resumes_bitwise_on_two_and_one(mpi, tmp_path):
    """--deterministic: the weights are bitwise the same whatever the rank counts before and after."""
    det = ("--deterministic", "--set", "dist.micro_shards=4")
    whole = tmp_path / "whole"
    mpi.ok(whole, *det)
    run = tmp_path / "run3"
    killed_run(mpi, run, *det, n=3)
    on_one = tmp_path / "run3-then-1"
    shutil.copytree(run, on_one)
    resumed(mpi, run, *det, n=2, saved_by=3)
    resumed(mpi, on_one, *det, saved_by=3)
    want = summary(whole)["param_sha256"]
    assert summary(run)["param_sha256"] == want
    assert summary(on_one)["param_sha256"] == want
    assert len(records(run, "step")) == EPOCHS * STEPS_PER_EPOCH + (KILL_AT - 1 - 9)  # step 10 replayed

