"""FashionMNIST: locating, loading (as (N, 1, 28, 28)), verifying the real files."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from ddtrain.data.fashion_mnist import (
    CLASSES,
    FILES,
    INPUT_SHAPE,
    DataNotFound,
    find_files,
    load_fashion_mnist,
    locate,
    verify,
)
from ddtrain.data.idx import read_bytes
from ddtrain.errors import DataError

# ----------------------------------------------------------------------------- locating


def fill(d: Path, gz: bool = True, skip: str | None = None) -> Path:
    """Put (empty) stand-ins for the four files in `d`: locating looks only at names."""
    d.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if f.name != skip:
            (d / (f.name + (".gz" if gz else ""))).touch()
    return d


def test_data_dir_wins_over_everything(tmp_path, places, monkeypatch):
    cache, system = places
    fill(cache), fill(system)
    monkeypatch.setenv("DDTRAIN_DATA", str(fill(tmp_path / "env")))
    assert locate(fill(tmp_path / "mine")) == tmp_path / "mine"


def test_env_var_wins_over_cache_and_system(tmp_path, places, monkeypatch):
    cache, system = places
    fill(cache), fill(system)
    monkeypatch.setenv("DDTRAIN_DATA", str(fill(tmp_path / "env", gz=False)))
    assert locate() == tmp_path / "env"


def test_cache_before_system_and_system_last(places):
    cache, system = places
    fill(system)
    assert locate() == system
    fill(cache)
    assert locate() == cache


def test_home_cache_when_xdg_unset(tmp_path, places, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fill(tmp_path / "home" / ".cache" / "ddtrain" / "fashion-mnist")
    assert locate() == tmp_path / "home" / ".cache" / "ddtrain" / "fashion-mnist"


def test_incomplete_directories_do_not_qualify(places):
    cache, system = places
    fill(cache, skip="t10k-labels-idx1-ubyte")
    fill(system)
    assert locate() == system


def test_explicit_places_must_qualify(tmp_path, places, monkeypatch):
    cache, _ = places
    fill(cache)  # would qualify, but an explicit choice never falls through
    mine = fill(tmp_path / "mine", skip="train-images-idx3-ubyte")
    with pytest.raises(DataError, match=r"--data-dir .*mine: lacks train-images-idx3-ubyte"):
        locate(mine)
    with pytest.raises(DataError, match="does not exist"):
        locate(tmp_path / "typo")
    monkeypatch.setenv("DDTRAIN_DATA", str(mine))
    with pytest.raises(DataError, match=r"\$DDTRAIN_DATA .*lacks"):
        locate()


def test_not_found_says_the_three_ways_to_get_it(places):
    with pytest.raises(DataNotFound) as e:
        locate()
    msg = str(e.value)
    assert "\n" not in msg
    for way in ("--data-dir", "$DDTRAIN_DATA", "apt-get install dataset-fashion-mnist", "ddtrain data download"):
        assert way in msg


def test_raw_preferred_over_gz(tmp_path):
    d = fill(tmp_path, gz=True)
    (d / "train-images-idx3-ubyte").touch()
    assert find_files(d)["train_x"] == d / "train-images-idx3-ubyte"
    assert find_files(d)["train_y"] == d / "train-labels-idx1-ubyte.gz"


# ----------------------------------------------------------------------------- loading the real data


def test_load_real(fmnist, fmnist_dir):
    assert fmnist.name == "fashion-mnist" and fmnist.source == str(fmnist_dir)
    assert fmnist.train_x.shape == (60000, 1, 28, 28) and fmnist.train_x.dtype == np.uint8
    assert fmnist.test_x.shape == (10000, 1, 28, 28) and fmnist.input_shape == INPUT_SHAPE == (1, 28, 28)
    assert fmnist.train_y.dtype == np.int64 and fmnist.num_classes == 10
    assert np.bincount(fmnist.train_y).tolist() == [6000] * 10
    assert fmnist.classes[0] == "T-shirt/top" and fmnist.classes[9] == "Ankle boot"
    assert fmnist.classes == list(CLASSES) and (fmnist.mean, fmnist.std) == (0.2860, 0.3530)


def test_images_view_the_file_bytes_with_a_channel_axis(fmnist_dir, fmnist):
    """(N, 1, 28, 28) costs nothing: a read-only view of the IDX bytes, pixels in file order, so
    `flatten` (what the bundled configs start with) sees the same 784 features as ever."""
    for key in ("train_x", "test_x"):
        x = getattr(fmnist, key)
        assert not x.flags.writeable and not x.flags.owndata and x.flags.c_contiguous
        data = read_bytes(find_files(fmnist_dir)[key])
        assert x.reshape(len(x), -1).shape[1] == 784 and x.tobytes() == data[16:]  # 16: the IDX header


def test_raw_files_load_the_same(fmnist_raw_root, fmnist):
    ds = load_fashion_mnist(fmnist_raw_root / "FashionMNIST" / "raw")
    for k in ("train_x", "train_y", "test_x", "test_y"):
        np.testing.assert_array_equal(getattr(ds, k), getattr(fmnist, k))


def copy_with(src_dir: Path, dst: Path, name: str, content: bytes) -> Path:
    """The real data in `dst`, with file `name` (.gz) replaced by gzip(content)."""
    dst.mkdir()
    for p in find_files(src_dir).values():
        shutil.copy(p, dst / p.name)
    (dst / f"{name}.gz").write_bytes(gzip.compress(content))
    return dst


def test_wrong_checksum_names_file_and_hashes(fmnist_dir, tmp_path):
    labels = gzip.decompress((fmnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes())
    altered = labels[:-1] + bytes([(labels[-1] + 1) % 10])  # still a valid IDX label file
    d = copy_with(fmnist_dir, tmp_path / "d", "t10k-labels-idx1-ubyte", altered)
    with pytest.raises(DataError) as e:
        load_fashion_mnist(d)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(d / "t10k-labels-idx1-ubyte.gz"))
    assert "sha256 mismatch: expected 0402a96d92fd..., got " in msg and "ddtrain data download" in msg
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: sha256 mismatch"):
        verify(d)
    ds = load_fashion_mnist(d, verify=False)  # the structure itself is fine
    assert ds.test_y[-1] == altered[-1]


def test_truncated_real_file_is_reported(fmnist_dir, tmp_path):
    images = gzip.decompress((fmnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    d = copy_with(fmnist_dir, tmp_path / "d", "t10k-images-idx3-ubyte", images[:1016])
    with pytest.raises(DataError, match=r"truncated: header says 10000x28x28 = 7840000 bytes, file has 1000"):
        load_fashion_mnist(d, verify=False)


def test_verify_real_data(fmnist_dir):
    directory, checked = verify(fmnist_dir)
    assert directory == fmnist_dir
    assert [f.key for f, _ in checked] == ["train_x", "train_y", "test_x", "test_y"]
    assert all(path.parent == fmnist_dir and path.name.startswith(f.name) for f, path in checked)
