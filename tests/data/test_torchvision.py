"""torchvision datasets: the optional extra, and agreement with torchvision itself.

The agreement test runs torchvision in its own venv ($DDTRAIN_TV_PYTHON, a python
with torch and torchvision; CI creates it) through tv_dump.py and compares here with
numpy, so ddtrain's own environment never needs torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddtrain.data.datasets import Dataset, load_dataset, normalize_batch
from ddtrain.data.torchvision_data import _write_npz, load_torchvision, npz_path
from ddtrain.errors import ConfigError, DataError

from tests.helpers import REPO, skip_or_fail


def test_missing_torchvision_says_what_to_install(tmp_path, monkeypatch):
    # None in sys.modules makes `import torchvision` fail exactly as if it were absent
    monkeypatch.setitem(sys.modules, "torchvision", None)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DataError, match="pip install torchvision"):
        load_dataset("torchvision:CIFAR10", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="torchvision:NAME"):
        load_dataset("torchvision:", data_dir=tmp_path)


def test_converted_arrays_load_without_torchvision(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    rng = np.random.default_rng(0)
    ds = Dataset(
        "torchvision:CIFAR10", str(tmp_path),
        train_x=rng.integers(0, 256, (50, 32, 32, 3), dtype=np.uint8), train_y=rng.integers(0, 10, 50),
        test_x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), test_y=rng.integers(0, 10, 20),
        classes=[f"c{i}" for i in range(10)], mean=0.47, std=0.25,
    )
    _write_npz(npz_path("CIFAR10", tmp_path), ds)
    got = load_dataset("torchvision:CIFAR10", data_dir=tmp_path, train_samples=30)
    assert got.name == "torchvision:CIFAR10" and got.input_shape == (32, 32, 3)
    np.testing.assert_array_equal(got.train_x, ds.train_x[:30])
    np.testing.assert_array_equal(got.test_y, ds.test_y)
    assert got.classes == ds.classes and (got.mean, got.std) == (0.47, 0.25)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = npz_path("Evil", tmp_path)
    np.savez(path, train_x=np.array([object()], dtype=object))
    with pytest.raises(DataError, match="unreadable"):
        load_torchvision("Evil", tmp_path)
    path.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match=r"Evil.ddtrain.npz: unreadable"):
        load_torchvision("Evil", tmp_path)


@pytest.fixture(scope="module")
def tv_dump(fmnist_raw_root, tmp_path_factory):
    """Run tv_dump.py under $DDTRAIN_TV_PYTHON; returns (root, out directory)."""
    python = os.environ.get("DDTRAIN_TV_PYTHON")
    if not python:
        skip_or_fail("DDTRAIN_TV_PYTHON (a python with torch and torchvision) is not set")
    if not Path(python).exists():
        pytest.fail(f"DDTRAIN_TV_PYTHON={python} does not exist")
    out = tmp_path_factory.mktemp("tvout")
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(
        [python, str(Path(__file__).with_name("tv_dump.py")), str(fmnist_raw_root), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return fmnist_raw_root, out


def test_torchvision_reads_the_same_arrays(tv_dump, fmnist):
    _, out = tv_dump
    for k in ("train_x", "train_y", "test_x", "test_y"):
        theirs = np.load(out / f"{k}.npy", allow_pickle=False)
        ours = getattr(fmnist, k)
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, k
        np.testing.assert_array_equal(theirs, ours, err_msg=k)


def test_normalisation_matches_torchvision_bitwise(tv_dump, fmnist):
    _, out = tv_dump
    x = fmnist.train_x[:256]
    for mode in ("unit", "standard"):
        theirs = np.load(out / f"{mode}.npy", allow_pickle=False)  # (256, 1, 28, 28)
        ours = normalize_batch(x, mode)
        np.testing.assert_array_equal(theirs.reshape(ours.shape), ours, err_msg=mode)


def test_converted_torchvision_dataset_equals_ours(tv_dump, fmnist):
    root, _ = tv_dump
    got = load_dataset("torchvision:FashionMNIST", data_dir=root)
    assert got.classes == fmnist.classes and got.input_shape == (28, 28)
    assert round(got.mean, 4) == 0.2860 and round(got.std, 4) == 0.3530
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(got, k), getattr(fmnist, k), err_msg=k)


def test_item_by_item_conversion_keeps_channels_last(tv_dump):
    _, out = tv_dump
    x, y = np.load(out / "fake_rgb_x.npy"), np.load(out / "fake_rgb_y.npy")
    assert x.dtype == np.uint8 and x.shape == (20, 32, 20, 3)  # FakeData image_size is (C, H, W)
    assert y.dtype == np.int64 and y.shape == (20,) and 0 <= y.min() and y.max() < 4
    np.testing.assert_array_equal(x[7], np.load(out / "fake_rgb_ref.npy"))
    assert len(np.unique(x.reshape(20, -1), axis=0)) == 20  # each item read, not one repeated
    gray = np.load(out / "fake_gray_x.npy")
    assert gray.shape == (5, 28, 28) and gray.dtype == np.uint8
