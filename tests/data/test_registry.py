"""Dataset names: resolved in one place, loaded through it, with their input shapes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ddtrain.config import load_config
from ddtrain.data import download as download_module
from ddtrain.data import fashion_mnist
from ddtrain.data.fashion_mnist import INPUT_SHAPE
from ddtrain.data.registry import FASHION_MNIST, input_shape, load_dataset, resolve
from ddtrain.errors import ConfigError, DataError
from tests.helpers import REPO


def test_names_resolve_in_one_place():
    assert resolve("fashion-mnist") == ("fashion-mnist", "") and FASHION_MNIST == fashion_mnist.NAME
    assert resolve("torchvision:CIFAR10") == ("torchvision", "CIFAR10")
    for bad in ("mnist", "torchvision:", "torchvision", "Fashion-MNIST", "tv:CIFAR10", ""):
        with pytest.raises(ConfigError, match=r"unknown dataset .*: use 'fashion-mnist' or torchvision:NAME"):
            resolve(bad)


def test_config_validation_uses_the_registry():
    good = load_config("tiny", overrides={"data.dataset": "torchvision:CIFAR10"})
    assert good.data.dataset == "torchvision:CIFAR10"
    for bad in ("mnist", "torchvision:"):
        with pytest.raises(ConfigError, match=rf"data.dataset: unknown dataset '{bad}'"):
            load_config("tiny", overrides={"data.dataset": bad})


def test_validating_a_config_imports_no_numpy():
    """`ddtrain train` sets the BLAS thread count after loading the config and before numpy loads."""
    code = ("import sys; from ddtrain.config import load_config; load_config('tiny'); "
            "from ddtrain.data.registry import resolve; resolve('torchvision:CIFAR10'); "
            "print('numpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_load_dataset_through_env_and_subset(fmnist_dir, monkeypatch, fmnist):
    monkeypatch.setenv("DDTRAIN_DATA", str(fmnist_dir))
    ds = load_dataset(train_samples=1000)
    assert ds.train_x.shape == (1000, 1, 28, 28) and len(ds.train_y) == 1000
    assert not ds.train_x.flags.owndata  # a view, no copy
    np.testing.assert_array_equal(ds.train_x, fmnist.train_x[:1000])
    assert len(ds.test_x) == 10000
    for bad in (0, 60001):
        with pytest.raises(ConfigError, match=r"train_samples must be in \[1, 60000\]"):
            load_dataset(train_samples=bad)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("mnist")


def test_input_shape_is_the_loaded_datasets(fmnist, places):
    # places: no data anywhere, so FashionMNIST's shape comes without reading a file
    assert input_shape("fashion-mnist") == INPUT_SHAPE == fmnist.input_shape
    with pytest.raises(ConfigError):
        input_shape("mnist")


def test_missing_data_is_downloaded_when_asked(places, fmnist_dir, monkeypatch):
    """A one-process `ddtrain train` fetches FashionMNIST into the cache when it is nowhere
    (here `download` copies the real files in place of the mirrors, which are offline)."""
    cache, _ = places
    calls, messages = [], []

    def fake_download(dest=None, log=None, **kw):
        calls.append(dest)
        cache.mkdir(parents=True)
        for f in fmnist_dir.iterdir():
            if "ubyte" in f.name:
                shutil.copy(f, cache / f.name)
        return cache

    monkeypatch.setattr(download_module, "download", fake_download)
    with pytest.raises(DataError, match="not found"):
        load_dataset()  # without download_missing: the error, no download
    assert calls == []
    ds = load_dataset(download_missing=messages.append)
    assert calls == [None] and len(ds.train_y) == 60000 and Path(ds.source) == cache
    assert messages and "downloading it into" in messages[0]
