"""The CLI end to end on the real dataset, one process: what a run writes, and the side commands."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import ddtrain, installed, require, step_losses, summary


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    tb = tmp_path_factory.mktemp("tb")
    # TensorBoard scalars only where the optional extra is installed: without it the other tests still run
    board = ["--tensorboard", str(tb)] if installed("tensorboardX") else []
    p = ddtrain(["train", "--config", "tiny", "--train-samples", "640", "--run-dir", str(d), *board,
                 "--set", "train.checkpoint_every=4"])
    assert p.returncode == 0, p.stdout + p.stderr
    return d, tb, p


def test_run_directory_contents(run):
    d, _, p = run
    assert sorted(x.name for x in d.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl", "summary.json"]
    records = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert [r["step"] for r in steps] == list(range(1, 21))  # 640/64 = 10 steps x 2 epochs, log_every 1
    assert all({"loss", "lr", "epoch", "samples_per_second", "timing_ms"} <= set(r) for r in steps)
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(0 <= r["test_accuracy"] <= 1 and r["train_loss"] > 0 for r in epochs)
    s = summary(d)
    for key in ("test_accuracy", "test_loss", "epochs", "world_size", "samples_per_second", "wall_seconds",
                "peak_rss_mb"):
        assert s[key] is not None, key
    assert s["test_accuracy"] == epochs[-1]["test_accuracy"] and s["world_size"] == 1
    # It learns: 640 images, 2 epochs reach 0.675 (chance is 0.10; a wrong gradient stays far below)
    assert s["test_accuracy"] >= 0.60 and epochs[1]["train_loss"] < epochs[0]["train_loss"], s["test_accuracy"]
    assert "test accuracy" in p.stdout and "Traceback" not in p.stderr


def test_checkpoints_every_n_steps_and_epochs_keep_last_k(run):
    d, _, _ = run
    names = sorted(x.name for x in (d / "checkpoints").iterdir())
    # steps 4, 8, 10 (epoch end), 12, 16, 20 (epoch end); keep 3
    assert names == ["latest", "step-00000012", "step-00000016", "step-00000020"]


def test_weights_are_pytorch_layout_safetensors(run):
    from safetensors.numpy import load_file
    d, _, _ = run
    w = load_file(str(d / "checkpoints" / "step-00000020" / "model.safetensors"))
    assert {k: v.shape for k, v in w.items()} == {"1.weight": (32, 784), "1.bias": (32,),
                                                    "3.weight": (10, 32), "3.bias": (10,)}
    assert all(v.dtype == np.float32 for v in w.values())


def test_evaluate_matches_the_final_epoch(run):
    d, _, _ = run
    p = ddtrain(["evaluate", "--checkpoint", str(d), "--json"])
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert result["step"] == 20
    assert result["test_accuracy"] == summary(d)["test_accuracy"]
    assert result["test_loss"] == pytest.approx(summary(d)["test_loss"], rel=1e-9)


def _tensorboard_scalars(directory: Path) -> dict:
    """Parse tensorboardX event files (TFRecord framing + Event protos) without TensorFlow."""
    from tensorboardX.proto.event_pb2 import Event
    scalars = {}
    for f in directory.rglob("events.out.tfevents.*"):
        data = f.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                scalars.setdefault(v.tag, {})[event.step] = v.simple_value
    return scalars


def test_tensorboard_has_the_same_figures_as_metrics(run):
    require("tensorboardX", "tensorboardX is an optional extra: pip install 'ddtrain[tensorboard]'")
    d, tb, _ = run
    scalars = _tensorboard_scalars(tb)
    losses = step_losses(d)
    assert scalars["train/loss"].keys() == losses.keys()
    for step, loss in losses.items():
        assert scalars["train/loss"][step] == pytest.approx(loss, rel=1e-6)
    assert scalars["epoch/test_accuracy"][20] == pytest.approx(summary(d)["test_accuracy"], rel=1e-6)


def test_plot_writes_a_png(run, tmp_path):
    require("matplotlib", "matplotlib is an optional extra: pip install 'ddtrain[plot]'")
    d, _, _ = run
    out = tmp_path / "m.png"
    p = ddtrain(["plot", str(d), "-o", str(out)])
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000


def test_resume_continues_exactly(tmp_path):
    """2 epochs straight == 1 epoch, then --resume auto for the second: same losses, same weights (bitwise)."""
    common = ["train", "--config", "tiny", "--train-samples", "640", "--epochs", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert ddtrain([*common, "--run-dir", str(straight)]).returncode == 0
    first = ddtrain([*common, "--run-dir", str(split), "--chaos", "raise:0:15"])
    assert first.returncode == 1 and "chaos: injected failure at step 15" in first.stderr
    resumed = ddtrain([*common, "--run-dir", str(split), "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "step-00000010" in resumed.stdout
    assert step_losses(split) == step_losses(straight)
    assert summary(split)["param_sha256"] == summary(straight)["param_sha256"]


def test_gradcheck_command_prints_a_table():
    p = ddtrain(["gradcheck", "--config", "tiny"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert "max rel error" in p.stdout and "FAIL" not in p.stdout and "passed" in p.stdout


def test_data_info_and_verify():
    p = ddtrain(["data", "verify"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("ok") >= 4
    p = ddtrain(["data", "info"])
    assert p.returncode == 0 and "using:" in p.stdout


def test_launch_dry_run_prints_the_command():
    p = ddtrain(["launch", "-n", "3", "--dry-run", "--", "train", "--config", "tiny"])
    assert p.returncode == 0, p.stderr
    assert "mpiexec" in p.stderr and "-n 3" in p.stderr and "train --config tiny" in p.stderr


def test_resume_with_more_epochs_says_the_schedule_is_replanned(tmp_path):
    """The schedule is a function of (step, total steps): a longer run re-plans the rest of it,
    so the resumed run trains differently from one planned that long; the resume line says so."""
    base = ["train", "--config", "tiny", "--train-samples", "640", "--run-dir", str(tmp_path)]
    assert ddtrain([*base, "--epochs", "1"]).returncode == 0
    p = ddtrain([*base, "--epochs", "2", "--resume", "auto"])
    assert p.returncode == 0, p.stdout + p.stderr
    assert ("the learning-rate schedule is re-planned from step 10 for 20 total steps "
            "(the checkpoint's run had 10)") in p.stdout, p.stdout
    resume = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["event"] == "resume"][0]
    assert resume["total_steps"] == 20 and resume["saved_total_steps"] == 10
