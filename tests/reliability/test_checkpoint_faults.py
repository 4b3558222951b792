"""Checkpoint faults in real training runs: SIGKILL during a write, damaged files on disk.

tests/train/test_checkpoint.py covers save_checkpoint/load_checkpoint on their own; here the
trainer writes, `ddtrain train --resume auto` and `ddtrain evaluate` read, all as processes.

Kill points: a run with checkpoints at steps 4 and 8 is killed (chaos kill at step 11);
resuming it with chaos.checkpoint_kill_point=k SIGKILLs the trainer at point k of its
next checkpoint write (step 12; the points are conftest.KILL_POINTS), with step 8 as the
previous checkpoint. A third run with `--resume auto` must find the new checkpoint (k = 5,
the pointer was updated) or the previous one (k < 5), say which, and finish with exactly
the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ddtrain.train.checkpoint import load_checkpoint, read_latest_pointer
from tests.reliability.conftest import KILL_POINTS, DDTrain, checkpoint_names, summary

EVERY_4 = ("--set", "train.checkpoint_every=4")


@pytest.fixture(scope="module")
def killed_at_11(tmp_path_factory, data_dir):
    """A run dir with checkpoints 4 and 8 whose run was SIGKILLed at step 11."""
    base = tmp_path_factory.mktemp("killed")
    r = DDTrain(base, data_dir, None).train(base / "run", *EVERY_4, "--chaos", "kill:0:11")
    assert r.rc == -9, r
    assert checkpoint_names(base / "run") == ["latest", "step-00000004", "step-00000008"]
    return base / "run"


@pytest.mark.parametrize("point", range(len(KILL_POINTS)), ids=lambda k: f"k{k}")
def test_kill_during_checkpoint_write_then_resume(ddtrain, reference, killed_at_11, tmp_path, point):
    run = tmp_path / "run"
    shutil.copytree(killed_at_11, run)
    ckpts = run / "checkpoints"
    r = ddtrain.train(run, *EVERY_4, "--resume", "auto", "--set", f"chaos.checkpoint_kill_point={point}")
    assert r.rc == -9, r
    assert f"after '{KILL_POINTS[point]}'" in r.out, r

    committed = point == len(KILL_POINTS) - 1  # only the last point comes after the pointer moved
    assert read_latest_pointer(ckpts) == ("step-00000012" if committed else "step-00000008")
    unfinished = sorted(p.name for p in ckpts.glob(".tmp-step-00000012-*"))
    assert len(unfinished) == (1 if point <= 3 else 0)  # before the rename, the write is a temporary
    assert (ckpts / "step-00000012").is_dir() == (point >= 4)

    r = ddtrain.ok(run, *EVERY_4, "--resume", "auto")
    expect = "step-00000012" if committed else "step-00000008"
    assert f"resumed from {ckpts / expect}" in r.out, r
    if unfinished:
        assert f"ignoring {unfinished[0]}: a checkpoint write that never finished" in r.out, r
    assert summary(run)["param_sha256"] == summary(reference)["param_sha256"]
    # Nothing left over: the newest 3 checkpoints (keep_checkpoints) and the pointer, all valid.
    assert checkpoint_names(run) == ["latest", "step-00000008", "step-00000012", "step-00000016"]
    for name in checkpoint_names(run)[1:]:
        load_checkpoint(ckpts / name)


# ------------------------------------------------------------------------------ damaged files
def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {  # what is done to the newest checkpoint -> what the report says about it
    "flipped-bit": (lambda c: flip_a_byte(c / "model.safetensors"),
                    "model.safetensors is corrupt: sha256 does not match the manifest"),
    "truncated": (lambda c: (c / "optimizer.safetensors").write_bytes((c / "optimizer.safetensors").read_bytes()[:-7]),
                  "optimizer.safetensors is truncated or padded"),
    "missing-file": (lambda c: (c / "state.json").unlink(), "state.json is missing"),
    "garbage-manifest": (lambda c: (c / "manifest.json").write_text("{\"format\": "), "manifest.json is unreadable"),
    "empty-dir": (lambda c: [p.unlink() for p in c.iterdir()], "manifest.json is missing"),
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_dir):
    """A finished run dir with checkpoints 12, 15 and 16 (checkpoint_every=3, keep 3)."""
    base = tmp_path_factory.mktemp("finished")
    r = DDTrain(base, data_dir, None).train(base / "run", "--set", "train.checkpoint_every=3")
    assert r.rc == 0, r
    assert checkpoint_names(base / "run") == ["latest", "step-00000012", "step-00000015", "step-00000016"]
    return base / "run"


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_named_and_skipped(ddtrain, reference, finished, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    newest = run / "checkpoints" / "step-00000016"
    do, says = DAMAGE[damage]
    do(newest)
    report = f"skipping invalid checkpoint: step-00000016: {says}"

    # ddtrain evaluate on the run dir: reports the damaged one, evaluates step 15.
    r = ddtrain.run("evaluate", "--checkpoint", run, "--json")
    assert r.rc == 0 and report in r.err, r
    assert json.loads(r.out)["step"] == 15
    # ... and on the damaged checkpoint itself: a one-line error naming it, exit 1.
    r = ddtrain.run("evaluate", "--checkpoint", newest)
    assert r.rc == 1 and f"step-00000016: {says}" in r.err and "Traceback" not in r.err, r

    # --resume auto: the same report, resumes from step 15, trains step 16 again, same weights.
    r = ddtrain.ok(run, "--set", "train.checkpoint_every=3", "--resume", "auto")
    assert report in r.out, r
    assert f"resumed from {run / 'checkpoints' / 'step-00000015'}: step 15" in r.out, r
    assert summary(run)["param_sha256"] == summary(reference)["param_sha256"]
    # The rewritten step 16 replaced the damaged one.
    ck = load_checkpoint(newest)
    assert ck.step == 16 and all(np.isfinite(v).all() for v in ck.model.values())


def test_every_checkpoint_damaged_is_a_clean_error_and_keeps_the_files(ddtrain, finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    for name in checkpoint_names(run)[1:]:
        flip_a_byte(run / "checkpoints" / name / "state.json")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    r = ddtrain.train(run, "--set", "train.checkpoint_every=3", "--resume", "auto")
    assert r.rc == 1 and "Traceback" not in r.err, r
    for name in ("step-00000016", "step-00000015", "step-00000012"):
        assert f"skipping invalid checkpoint: {name}: state.json is corrupt" in r.out, r
    assert "no valid checkpoint in" in r.err, r
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before  # nothing deleted, rewritten or added by the refused resume
