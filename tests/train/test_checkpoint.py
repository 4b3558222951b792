"""Crash-safe checkpoints: atomic writes under SIGKILL, verification, fallback, pruning."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers import require

from ddtrain.errors import CheckpointError
from ddtrain.train.checkpoint import (find_resume_checkpoint, load_checkpoint, read_latest_pointer,
                                      save_checkpoint)


def tensors(step):
    rng = np.random.default_rng(step)
    return ({"1.weight": rng.standard_normal((4, 3)).astype(np.float32), "1.bias": np.full(4, step, np.float32)},
            {"momentum": rng.standard_normal(16).astype(np.float32), "step": np.array([step], np.int64)})


def save(root, step, keep=3, on_point=None):
    model, opt = tensors(step)
    return save_checkpoint(root, step, model, opt, {"global_step": step, "cursor": {"step": step}},
                           keep=keep, on_point=on_point)


def test_round_trip_is_exact(tmp_path):
    path = save(tmp_path, 7)
    ck = load_checkpoint(path)
    model, opt = tensors(7)
    assert ck.step == 7 and read_latest_pointer(tmp_path) == path.name
    for k in model:
        assert ck.model[k].dtype == np.float32 and np.array_equal(ck.model[k], model[k])
    assert np.array_equal(ck.optimizer["momentum"], opt["momentum"])


def test_torch_reads_weights_without_ddtrain(tmp_path):
    require("torch", "torch is the comparison reference: pip install torch")
    torch = require("safetensors.torch", "safetensors.torch needs torch")
    path = save(tmp_path, 3)
    loaded = torch.load_file(str(path / "model.safetensors"))
    assert tuple(loaded["1.weight"].shape) == (4, 3)


def test_keep_last_k_and_no_leftovers(tmp_path):
    for step in range(1, 301, 3):
        save(tmp_path, step, keep=4)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step-00000289", "step-00000292", "step-00000295", "step-00000298"]
    assert read_latest_pointer(tmp_path) == "step-00000298"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "manifest"])
def test_damaged_checkpoint_is_named_and_skipped(tmp_path, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    target = newest / "model.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-5])
    elif damage == "missing":
        target.unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="step-00000002"):
        load_checkpoint(newest)
    warnings = []
    ck = find_resume_checkpoint(tmp_path, warn=warnings.append)
    assert ck.step == 1
    assert len(warnings) == 1 and "step-00000002" in warnings[0]


def test_loading_never_unpickles(tmp_path):
    """A pickle payload with a forged manifest is refused as unparsable, and nothing runs."""
    import hashlib
    import pickle
    newest = save(tmp_path, 5)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps(Evil())
    (newest / "model.safetensors").write_bytes(payload)
    manifest = json.loads((newest / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    (newest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot parse"):
        load_checkpoint(newest)
    assert not marker.exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from ddtrain.train.checkpoint import save_checkpoint
    root, step, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    count = [0]
    def on_point(what):
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        count[0] += 1
    rng = np.random.default_rng(step)
    save_checkpoint(root, step, {"w": rng.standard_normal(1000).astype(np.float32)},
                    {"m": np.zeros(1000, np.float32)}, {"global_step": step}, keep=3, on_point=on_point)
""")


def test_sigkill_at_every_point_of_a_write_leaves_a_valid_checkpoint(tmp_path):
    """kill -9 the writer after each durable step; resume always finds the new or the previous one."""
    outcomes = []
    for kill_at in range(7):  # 3 files, manifest, rename, latest: 6 points, then one past the end
        root = tmp_path / f"k{kill_at}"
        save(root, 1)
        proc = subprocess.run([sys.executable, "-c", KILLER, str(root), "2", str(kill_at)], capture_output=True)
        ck = find_resume_checkpoint(root, warn=lambda m: None)
        assert ck is not None and ck.step in (1, 2)
        assert ck.step == 2 or proc.returncode == -9
        outcomes.append((kill_at, proc.returncode, ck.step))
    # killed before the `latest` pointer moves: the previous one; after it: the new one
    assert [o[2] for o in outcomes] == [1, 1, 1, 1, 1, 2, 2]
    assert [o[1] for o in outcomes] == [-9] * 6 + [0]


def _mount_tmpfs(path, size):
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def test_disk_full_is_a_clear_error_and_keeps_the_previous(tmp_path):
    root = tmp_path / "small"
    if not _mount_tmpfs(root, "64k"):
        if os.environ.get("CI") == "true":
            pytest.fail("cannot mount a tmpfs to simulate a full disk (CI=true: required)")
        pytest.skip("cannot mount a tmpfs (needs root) to simulate a full disk")
    try:
        small = {"w": np.zeros(10, np.float32)}
        save_checkpoint(root, 1, small, small, {"global_step": 1}, keep=3)
        big = {"w": np.zeros(100_000, np.float32)}
        with pytest.raises(CheckpointError, match="no space left on device; the previous checkpoint "
                                                  "step-00000001 is intact"):
            save_checkpoint(root, 2, big, big, {"global_step": 2}, keep=3)
        assert find_resume_checkpoint(root, warn=lambda m: None).step == 1
        assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000001"]
    finally:
        subprocess.run(["umount", str(root)])
