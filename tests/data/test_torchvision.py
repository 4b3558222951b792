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

from ddtrain.data.dataset import Dataset
from ddtrain.data.registry import load_dataset
from ddtrain.data.torchvision_data import _to_arrays, _write_npz, load_torchvision, npz_path
from ddtrain.data.transforms import normalize_batch
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
        train_x=rng.integers(0, 256, (50, 3, 32, 32), dtype=np.uint8), train_y=rng.integers(0, 10, 50),
        test_x=rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8), test_y=rng.integers(0, 10, 20),
        classes=[f"c{i}" for i in range(10)], mean=0.47, std=0.25,
    )
    _write_npz(npz_path("CIFAR10", tmp_path), ds)
    got = load_dataset("torchvision:CIFAR10", data_dir=tmp_path, train_samples=30)
    assert got.name == "torchvision:CIFAR10" and got.input_shape == (3, 32, 32)
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
        if k.endswith("_x"):  # torchvision keeps grayscale images (N, H, W); ours carry the channel axis
            theirs = theirs[:, None]
        ours = getattr(fmnist, k)
        assert theirs.dtype == ours.dtype and theirs.shape == ours.shape, k
        np.testing.assert_array_equal(theirs, ours, err_msg=k)


def test_normalisation_matches_torchvision_bitwise(tv_dump, fmnist):
    _, out = tv_dump
    x = fmnist.train_x[:256]
    for mode in ("unit", "standard"):
        theirs = np.load(out / f"{mode}.npy", allow_pickle=False)  # (256, 1, 28, 28): the same layout
        ours = normalize_batch(x, mode)
        assert theirs.shape == ours.shape, mode
        np.testing.assert_array_equal(theirs, ours, err_msg=mode)


def test_converted_torchvision_dataset_equals_ours(tv_dump, fmnist):
    root, _ = tv_dump
    got = load_dataset("torchvision:FashionMNIST", data_dir=root)
    assert got.classes == fmnist.classes and got.input_shape == (1, 28, 28)
    assert round(got.mean, 4) == 0.2860 and round(got.std, 4) == 0.3530
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(got, k), getattr(fmnist, k), err_msg=k)


def test_item_by_item_conversion_stores_channels_first(tv_dump):
    _, out = tv_dump
    x, y = np.load(out / "fake_rgb_x.npy"), np.load(out / "fake_rgb_y.npy")
    assert x.dtype == np.uint8 and x.shape == (20, 3, 32, 20)  # FakeData image_size is (C, H, W)
    assert y.dtype == np.int64 and y.shape == (20,) and 0 <= y.min() and y.max() < 4
    np.testing.assert_array_equal(x[7], np.load(out / "fake_rgb_ref.npy").transpose(2, 0, 1))  # PIL: (H, W, C)
    assert len(np.unique(x.reshape(20, -1), axis=0)) == 20  # each item read, not one repeated
    gray = np.load(out / "fake_gray_x.npy")
    assert gray.shape == (5, 1, 28, 28) and gray.dtype == np.uint8


class _TorchvisionLike:
    """A dataset shaped as torchvision's are: `data` in some layout, `targets`, and items
    (image as PIL would give it, (H, W) or (H, W, C), int label); here over real pixels."""

    def __init__(self, data: np.ndarray, items_hwc: np.ndarray, targets: np.ndarray):
        self.data, self._items, self.targets = data, items_hwc, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self._items[i]
        return (img[..., 0] if img.shape[-1] == 1 else img), int(self.targets[i])


def test_every_storage_layout_becomes_channels_first(fmnist):
    """Grey (N, H, W), PIL's (N, H, W, C) (CIFAR) and (N, C, H, W) (SVHN) all come out (N, C, H, W)
    from the fast path (the dataset's own array), equal to reading every item."""
    gray = fmnist.train_x[:40, 0]  # (40, 28, 28)
    rgb_hwc = np.ascontiguousarray(np.stack([gray, 255 - gray, gray // 2], axis=-1))  # (40, 28, 28, 3)
    y = fmnist.train_y[:40]
    want_gray, want_rgb = gray[:, None], rgb_hwc.transpose(0, 3, 1, 2)
    cases = [
        (gray, gray[..., None], want_gray),
        (rgb_hwc, rgb_hwc, want_rgb),
        (np.ascontiguousarray(want_rgb), rgb_hwc, want_rgb),
        (None, rgb_hwc, want_rgb),  # no usable `data`: item by item
    ]
    for data, items, want in cases:
        x, labels = _to_arrays(_TorchvisionLike(data, items, y), "Test")
        assert x.shape == want.shape and x.flags.c_contiguous
        np.testing.assert_array_equal(x, want)
        np.testing.assert_array_equal(labels, y)


def test_channels_last_files_of_earlier_versions_are_converted_once(tmp_path, fmnist):
    """A converted file without a ``layout`` entry holds (N, H, W) or (N, H, W, C): read channels
    first, and rewritten so that later loads need no conversion."""
    gray = fmnist.test_x[:30, 0]
    rgb = np.ascontiguousarray(np.stack([gray, gray, 255 - gray], axis=-1))
    for name, x, shape in (("Grey", gray, (1, 28, 28)), ("Colour", rgb, (3, 28, 28))):
        path = npz_path(name, tmp_path)
        y = fmnist.test_y[:30]
        np.savez(path, train_x=x, train_y=y, test_x=x[:10], test_y=y[:10],
                 classes=np.array(fmnist.classes), mean=np.float64(0.3), std=np.float64(0.3))
        got = load_torchvision(name, tmp_path, download=False)
        assert got.input_shape == shape
        np.testing.assert_array_equal(got.train_x, x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2))
        with np.load(path) as z:
            assert str(z["layout"]) == "NCHW" and z["train_x"].shape == (30, *shape)
        again = load_torchvision(name, tmp_path, download=False)
        np.testing.assert_array_equal(again.test_x, got.test_x)
