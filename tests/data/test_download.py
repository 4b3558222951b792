"""The downloader, against HTTP servers on 127.0.0.1 serving the real files (and broken ones)."""

from __future__ import annotations

import functools
import gzip
import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from ddtrain.data.download import download
from ddtrain.data.fashion_mnist import FILES, verify
from ddtrain.errors import DataError


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
    assert len(verify(dest)[1]) == 4
    # everything valid: nothing is fetched (there is no mirror to fetch from)
    lines.clear()
    download(dest, mirrors=[], log=lines.append)
    assert all("already there" in line for line in lines) and len(lines) == 4
    # a corrupt raw file shadowing a good .gz: re-fetched, and the raw one removed
    (dest / "t10k-labels-idx1-ubyte").write_bytes(b"junk")
    download(dest, mirrors=[good], timeout=5)
    assert not (dest / "t10k-labels-idx1-ubyte").exists()
    assert len(verify(dest)[1]) == 4


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
