"""``ddtrain data info`` and ``ddtrain data verify``: what they print, in-process (click's runner)."""

from __future__ import annotations

import gzip
import shutil

from click.testing import CliRunner

from ddtrain.cli import main
from ddtrain.data.fashion_mnist import find_files


def run(*args: str):
    return CliRunner().invoke(main, ["data", *args])


def test_info_and_verify_on_real_data(fmnist_dir):
    r = run("info", "--data-dir", str(fmnist_dir))
    assert r.exit_code == 0, r.output
    assert "dataset: fashion-mnist, 10 classes: T-shirt/top," in r.stdout
    assert f"--data-dir: {fmnist_dir} (ok)" in r.stdout and f"using: {fmnist_dir} (--data-dir)" in r.stdout
    assert "60000x28x28 uint8" in r.stdout and "10000 uint8" in r.stdout
    r = run("verify", "--data-dir", str(fmnist_dir))
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0] == f"checking {fmnist_dir}"
    assert sum(line.startswith("  ok  ") for line in r.stdout.splitlines()) == 4


def test_info_reports_missing_and_bad_data_verify_fails(places, fmnist_dir, tmp_path):
    r = run("info")  # nothing anywhere: a report, not a failure
    assert r.exit_code == 0, r.output
    assert "user cache:" in r.stdout and "(not found)" in r.stdout
    assert any(line.startswith("using: none; get it one of three ways") for line in r.stdout.splitlines())
    r = run("verify")
    assert r.exit_code == 1 and "error: FashionMNIST not found" in r.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for p in find_files(fmnist_dir).values():
        shutil.copy(p, bad / p.name)
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x01\0\0\0\x01x"))
    r = run("info", "--data-dir", str(bad))
    assert r.exit_code == 0 and "t10k-labels-idx1-ubyte.gz" in r.stdout and "1 uint8" in r.stdout
    r = run("verify", "--data-dir", str(bad))
    assert r.exit_code == 1 and "t10k-labels-idx1-ubyte.gz: sha256 mismatch" in r.stderr
    assert r.stderr.count("\n") == 1  # one line
