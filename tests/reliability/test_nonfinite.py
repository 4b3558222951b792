"""Non-finite losses, gradients and weights: stop naming the step (or skip it when asked), and
never write a checkpoint with NaN/Inf weights. Real runs, real data."""

from __future__ import annotations

import numpy as np
import pytest

from ddtrain.train.checkpoint import list_checkpoints, load_checkpoint
from tests.reliability.conftest import records, summary

def all_finite(run_dir) -> list[str]:
    """Names of the checkpoints on disk; asserts each has only finite weights and state."""
    names = []
    for path in list_checkpoints(run_dir / "checkpoints"):
        ck = load_checkpoint(path)
        for k, v in {**ck.model, **ck.optimizer}.items():
            assert np.isfinite(v).all(), f"{path.name}: {k} has non-finite values"
        names.append(path.name)
    return names


def nan_run(runner, run, rank: int, n=None):
    r = runner.train(run, "--set", "train.checkpoint_every=3", "--chaos", f"nan:{rank}:11", n=n)
    assert r.rc == 1 and "Traceback" not in r.err, r
    assert "non-finite loss or gradient at step 11 (epoch 2); stopped without writing a checkpoint" in r.err, r
    assert all_finite(run) == ["step-00000009", "step-00000008", "step-00000006"]
    assert max(rec["step"] for rec in records(run, "step")) == 10
    return r


def test_nan_gradient_stops_naming_the_step(ddtrain, tmp_path):
    nan_run(ddtrain, tmp_path / "run", rank=0)


@pytest.mark.mpi
def test_nan_gradient_on_one_rank_stops_every_rank(mpi, tmp_path):
    r = nan_run(mpi, tmp_path / "run", rank=1, n=2)
    # every rank sees the same reduced gradient: the job ends cleanly, one message, no MPI abort
    assert r.err.count("error: non-finite loss or gradient at step 11") == 1, r
    assert "rank 0:" not in r.err and "rank 1: error" not in r.err, r


def test_nan_gradient_skipped_when_asked(ddtrain, tmp_path):
    run = tmp_path / "run"
    r = ddtrain.ok(run, "--set", "train.checkpoint_every=3", "--set", "train.nonfinite=skip",
                   "--chaos", "nan:0:11")
    assert "step 11: non-finite gradient, step skipped (train.nonfinite=skip)" in r.out, r
    assert all_finite(run)[0] == "step-00000016"
    assert summary(run)["steps"] == 16 and 0.5 < summary(run)["test_accuracy"] < 1


def test_weights_overflowed_by_a_huge_lr_are_never_checkpointed(ddtrain, tmp_path):
    """lr 1e300 is inf in float32: the first step makes the weights non-finite from finite
    gradients. The checkpoint due at that step is refused, naming the step."""
    run = tmp_path / "run"
    r = ddtrain.train(run, "--lr", "1e300", "--set", "train.checkpoint_every=1")
    assert r.rc == 1 and "Traceback" not in r.err, r
    assert "non-finite weights after step 1 (epoch 1); stopped without writing a checkpoint" in r.err, r
    assert all_finite(run) == []
