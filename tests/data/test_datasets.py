"""FashionMNIST: locating, loading, verifying, normalising, downloading (from a local server)."""

from __future__ import annotations

import functools
import gzip
import http.server
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ddtrain.data import datasets
from ddtrain.data.datasets import (
    FILES,
    MEAN,
    STD,
    download,
    find_files,
    info,
    load_dataset,
    load_fashion_mnist,
    locate,
    normalize_batch,
    pixel_stats,
    verify,
)
from ddtrain.errors import ConfigError, DataError

# ----------------------------------------------------------------------------- locating


def fill(d: Path, gz: bool = True, skip: str | None = None) -> Path:
    """Put (empty) stand-ins for the four files in `d`: locating looks only at names."""
    d.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        if f.name != skip:
            (d / (f.name + (".gz" if gz else ""))).touch()
    return d


@pytest.fixture
def places(tmp_path, monkeypatch):
    """Empty cache and system directories, $DDTRAIN_DATA unset; returns (cache, system)."""
    monkeypatch.delenv("DDTRAIN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    system = tmp_path / "usr-share"
    monkeypatch.setattr(datasets, "SYSTEM_DIR", system)
    return tmp_path / "xdg" / "ddtrain" / "fashion-mnist", system


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
    with pytest.raises(DataError) as e:
        locate()
    msg = str(e.value)
    assert "\n" not in msg
    for way in ("--data-dir", "$DDTRAIN_DATA", "apt-get install dataset-fashion-mnist", "ddtrain data download"):
        assert way in msg
    info_lines = info()  # reports, does not raise
    assert any(line.startswith("using: none") for line in info_lines)


def test_raw_preferred_over_gz(tmp_path):
    d = fill(tmp_path, gz=True)
    (d / "train-images-idx3-ubyte").touch()
    assert find_files(d)["train_x"] == d / "train-images-idx3-ubyte"
    assert find_files(d)["train_y"] == d / "train-labels-idx1-ubyte.gz"


# ----------------------------------------------------------------------------- loading the real data


def test_load_real(fmnist, fmnist_dir):
    assert fmnist.name == "fashion-mnist" and fmnist.source == str(fmnist_dir)
    assert fmnist.train_x.shape == (60000, 28, 28) and fmnist.train_x.dtype == np.uint8
    assert fmnist.test_x.shape == (10000, 28, 28) and fmnist.input_shape == (28, 28)
    assert fmnist.train_y.dtype == np.int64 and fmnist.num_classes == 10
    assert np.bincount(fmnist.train_y).tolist() == [6000] * 10
    assert fmnist.classes[0] == "T-shirt/top" and fmnist.classes[9] == "Ankle boot"


def test_load_dataset_through_env_and_subset(fmnist_dir, monkeypatch, fmnist):
    monkeypatch.setenv("DDTRAIN_DATA", str(fmnist_dir))
    ds = load_dataset(train_samples=1000)
    assert ds.train_x.shape == (1000, 28, 28) and len(ds.train_y) == 1000
    np.testing.assert_array_equal(ds.train_x, fmnist.train_x[:1000])
    assert len(ds.test_x) == 10000
    for bad in (0, 60001):
        with pytest.raises(ConfigError, match=r"train_samples must be in \[1, 60000\]"):
            load_dataset(train_samples=bad)
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("mnist")


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


def test_info_and_verify_on_real_data(fmnist_dir):
    text = "\n".join(info(fmnist_dir))
    assert f"using: {fmnist_dir} (--data-dir)" in text
    assert "60000x28x28 uint8" in text and "10000 uint8" in text
    lines = verify(fmnist_dir)
    assert sum(line.strip().startswith("ok ") for line in lines) == 4


# ----------------------------------------------------------------------------- normalisation


def test_pixel_stats_match_the_published_constants(fmnist):
    mean, std = pixel_stats(fmnist.train_x)
    assert round(mean, 4) == MEAN and round(std, 4) == STD


def test_normalize_unit_and_standard():
    x = np.arange(256, dtype=np.uint8).reshape(4, 8, 8)
    unit = normalize_batch(x, "unit")
    assert unit.dtype == np.float32 and unit.shape == x.shape
    np.testing.assert_array_equal(unit, x.astype(np.float32) / np.float32(255))
    assert unit[0, 0, 0] == 0 and unit[-1, -1, -1] == 1
    std = normalize_batch(x, "standard")
    expected = (x.astype(np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(std, expected)
    custom = normalize_batch(x, "standard", mean=0.5, std=0.25)
    np.testing.assert_allclose(custom, (x / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_standard_mode_centres_the_real_data(fmnist):
    z = normalize_batch(fmnist.train_x[:20000], "standard")
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_normalize_writes_into_out_of_any_shape():
    x = np.random.default_rng(0).integers(0, 256, (16, 28, 28), dtype=np.uint8)
    buf = np.full((32, 784), np.nan, dtype=np.float32)
    out = normalize_batch(x, "unit", out=buf[:16])
    assert out.shape == (16, 784) and np.shares_memory(out, buf)
    np.testing.assert_array_equal(buf[:16].reshape(16, 28, 28), normalize_batch(x, "unit"))
    assert np.isnan(buf[16:]).all()
    for bad in (np.empty((16, 784), np.float64), np.empty((16, 783), np.float32), np.empty((784, 16), np.float32).T):
        with pytest.raises(ValueError, match="out must be"):
            normalize_batch(x, "unit", out=bad)
    with pytest.raises(ConfigError, match="normalize must be one of unit, standard"):
        normalize_batch(x, "minmax")


# ----------------------------------------------------------------------------- download


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """serve(directory) -> base URL of an HTTP server on 127.0.0.1 serving it."""
    servers = []

    def start(directory: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(directory))
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def test_download_from_local_mirror_falls_back_verifies_and_skips(fmnist_dir, serve, tmp_path):
    good = serve(fmnist_dir)
    dest = tmp_path / "cache"
    lines = []
    got = download(dest, mirrors=[good + "missing/", good], timeout=5, log=lines.append)
    assert got == dest and sorted(p.name for p in dest.iterdir()) == sorted(f"{f.name}.gz" for f in FILES)
    assert sum(line.startswith("  saved ") for line in lines) == 4
    assert sum(line.startswith("  failed: HTTP 404") for line in lines) == 4
    assert len(verify(dest)) == 5
    # everything valid: nothing is fetched (there is no mirror to fetch from)
    lines.clear()
    download(dest, mirrors=[], log=lines.append)
    assert all("already there" in line for line in lines) and len(lines) == 4
    # a corrupt raw file shadowing a good .gz: re-fetched, and the raw one removed
    (dest / "t10k-labels-idx1-ubyte").write_bytes(b"junk")
    download(dest, mirrors=[good], timeout=5)
    assert not (dest / "t10k-labels-idx1-ubyte").exists()
    assert len(verify(dest)) == 5


def test_download_rejects_corrupt_mirror_and_leaves_nothing(fmnist_dir, serve, tmp_path):
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    for f in FILES:
        (bad_dir / f"{f.name}.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01x"))
    bad, empty = serve(bad_dir), serve(tmp_path / "bad" / "..")
    dest = tmp_path / "dest"
    with pytest.raises(DataError) as e:
        download(dest, mirrors=[bad, empty + "nothing-here/"], timeout=5)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("could not download train-images-idx3-ubyte.gz")
    assert "sha256 mismatch: expected c59f468a2f67" in msg and "HTTP 404" in msg
    assert "without internet" in msg and "--data-dir" in msg and "dataset-fashion-mnist" in msg
    assert list(dest.iterdir()) == []  # no partial or unverified file


def test_download_failure_is_quick_and_clean(tmp_path):
    # a refused connection, and a server that accepts but never answers (the timeout)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        t0 = time.monotonic()
        with pytest.raises(DataError) as e:
            download(
                tmp_path / "d",
                mirrors=[f"http://127.0.0.1:{refused_port}/", f"http://127.0.0.1:{silent.getsockname()[1]}/"],
                timeout=0.5,
            )
        assert time.monotonic() - t0 < 10
    finally:
        silent.close()
    msg = str(e.value)
    assert "\n" not in msg and "refused" in msg.lower() and "timed out" in msg.lower()
    assert "apt-get install dataset-fashion-mnist" in msg
    assert list((tmp_path / "d").iterdir()) == []


@pytest.mark.gpu
def test_normalize_on_the_gpu_matches_the_cpu():
    from ddtrain.backend import resolve_backend

    be = resolve_backend("auto")
    if not be.is_gpu:
        pytest.skip("needs CuPy and a CUDA device")
    x = np.random.default_rng(1).integers(0, 256, (64, 28, 28), dtype=np.uint8)
    buf = be.xp.empty((64, 784), dtype=be.xp.float32)
    for mode in ("unit", "standard"):
        out = normalize_batch(be.from_host(x), mode, out=buf)
        assert out is buf
        np.testing.assert_array_equal(be.to_host(out).reshape(x.shape), normalize_batch(x, mode))


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

    monkeypatch.setattr(datasets, "download", fake_download)
    with pytest.raises(DataError, match="not found"):
        load_dataset()  # without download_missing: the error, no download
    assert calls == []
    ds = load_dataset(download_missing=messages.append)
    assert calls == [None] and len(ds.train_y) == 60000 and Path(ds.source) == cache
    assert messages and "downloading it into" in messages[0]
