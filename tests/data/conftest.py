"""Fixtures for the data tests: where the real FashionMNIST is, empty search places, the CI rule.

The real-data lookup (`fmnist_dir`) is generic enough for every test directory; it
may move to tests/conftest.py.

CI rule: a test that needs something absent here (the real data, the torchvision
venv) skips with the reason locally and fails when CI=true, so CI never passes by
skipping.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from ddtrain.data import fashion_mnist
from ddtrain.data.fashion_mnist import FILES, find_files, load_fashion_mnist
from tests.helpers import data_dir as find_real_data


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """The directory with the real FashionMNIST IDX files: $DDTRAIN_DATA, else ../shared/data/fashion-mnist."""
    return find_real_data()


@pytest.fixture(scope="session")
def fmnist(fmnist_dir):
    """The real dataset, loaded (and verified) once per session."""
    return load_fashion_mnist(fmnist_dir)


@pytest.fixture(scope="session")
def fmnist_raw_root(fmnist_dir, tmp_path_factory) -> Path:
    """A torchvision-style root: ROOT/FashionMNIST/raw/<gunzipped IDX files>."""
    root = tmp_path_factory.mktemp("tvroot")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for key, src in find_files(fmnist_dir).items():
        name = next(f.name for f in FILES if f.key == key)
        opener = gzip.open if src.suffix == ".gz" else open
        with opener(src, "rb") as fin, open(raw / name, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    return root


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty cache and system directories, $DDTRAIN_DATA unset; returns (cache, system)."""
    monkeypatch.delenv("DDTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    system = tmp_path / "usr-share"
    monkeypatch.setattr(fashion_mnist, "SYSTEM_DIR", system)
    return tmp_path / "xdg" / "ddtrain" / "fashion-mnist", system
