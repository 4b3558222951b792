"""Bad input, all refused cleanly: the real CLI as a process, one row per bad input.

Each row: what to run, the exit status (2: usage/config, 1: runtime) and a substring of
the one-line message on stderr. Every row also checks that stderr holds no Python
traceback; `--debug` shows one (TestDebug). Rows that point at an existing run check that
the refused command changed nothing in it.
"""

from __future__ import annotations

import gzip
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from ddtrain.data.fashion_mnist import FILES
from tests.reliability.conftest import BASE

LABELS = "train-labels-idx1-ubyte"


@dataclass
class Ctx:
    """What a row's command may need: its tmp dir, the real data, a finished run (a copy)."""

    tmp: Path
    data: Path
    real_data: Path
    reference: Path

    def yaml(self, text: str) -> str:
        path = self.tmp / "bad.yaml"
        path.write_text(text)
        return str(path)

    def a_directory(self, name: str) -> str:
        (self.tmp / name).mkdir()
        return str(self.tmp / name)

    def under_a_file(self) -> str:
        """A run dir path whose parent is a regular file (root ignores chmod; this never works)."""
        (self.tmp / "file").write_text("x")
        return str(self.tmp / "file" / "run")

    def finished_run(self) -> Path:
        run = self.tmp / "finished"
        if not run.exists():
            shutil.copytree(self.reference, run)
        return run

    def damaged_data(self, damage: Callable[[bytes], bytes] | None, gz: bool = False) -> str:
        """A data dir: the real files (symlinked), the training labels damaged by `damage`
        (None: left out); gz: write them gzip-compressed as NAME.gz."""
        d = self.tmp / "data"
        d.mkdir()
        for f in FILES:
            if f.name != LABELS:
                (d / f.name).symlink_to(self.data / f.name)
        if damage is not None:
            good = (self.data / LABELS).read_bytes()
            if gz:
                (d / f"{LABELS}.gz").write_bytes(damage(gzip.compress(good)))
            else:
                (d / LABELS).write_bytes(damage(good))
        return str(d)


def train(ctx: Ctx, *args, run: str = "run") -> list[str]:
    """`ddtrain train` with the fast options; run="finished": in a copy of a finished run."""
    run_dir = ctx.finished_run() if run == "finished" else ctx.tmp / run
    return ["train", *BASE, "--run-dir", str(run_dir), *map(str, args)]


def set_byte(data: bytes, at: int, value: int) -> bytes:
    return data[:at] + bytes([value]) + data[at + 1:]


SHA = f"{LABELS}: sha256 mismatch"  # a well-formed file with other content
# (rows, as (id, command, exit status, message)); `c` is a Ctx
ROWS = [
    # ---- options and config values (exit 2)
    ("unknown-key", lambda c: train(c, "--set", "train.epoch=3"), 2,
     "unknown key train.epoch (did you mean 'epochs'?)"),
    ("unknown-key-yaml", lambda c: ["train", "--config", c.yaml("train:\n  batch_sise: 32\n")], 2,
     "unknown key train.batch_sise (did you mean 'batch_size'?)"),
    ("unknown-section-yaml", lambda c: ["train", "--config", c.yaml("optimiser:\n  lr: 0.1\n")], 2,
     "unknown section 'optimiser' (did you mean 'optimizer'?)"),
    ("unknown-config", lambda c: ["train", "--config", "tinyy"], 2, "config 'tinyy' not found"),
    ("unknown-choice", lambda c: train(c, "--set", "optimizer.name=adamm"), 2,
     "optimizer.name must be one of sgd, adam, adamw, not 'adamm' (did you mean 'adam'?)"),
    ("unknown-layer", lambda c: train(c, "--set", "model.layers=[{type: flaten}, {type: linear, out: 10}]"), 2,
     "layer 0: unknown layer type 'flaten' (did you mean 'flatten'?)"),
    ("wrong-type", lambda c: train(c, "--set", "train.batch_size=abc"), 2,
     "train.batch_size: expected int, got str 'abc'"),
    ("wrong-type-yaml", lambda c: ["train", "--config", c.yaml("optimizer:\n  lr: [0.1]\n")], 2,
     "optimizer.lr: expected float, got list"),
    ("lr-zero", lambda c: train(c, "--lr", "0"), 2, "optimizer.lr must be > 0.0, got 0.0"),
    ("lr-negative", lambda c: train(c, "--set", "optimizer.lr=-0.5"), 2, "optimizer.lr must be > 0.0, got -0.5"),
    ("epochs-zero", lambda c: train(c, "--epochs", "0"), 2, "train.epochs must be >= 1, got 0"),
    ("timeout-zero", lambda c: train(c, "--timeout", "0"), 2, "dist.timeout must be > 0.0"),
    ("batch-over-dataset", lambda c: train(c, "--batch-size", "513"), 2,
     "train.batch_size 513 is larger than the training set (512 samples)"),
    ("samples-over-dataset", lambda c: train(c, "--train-samples", "60001"), 2,
     "train_samples must be in [1, 60000]"),
    ("malformed-yaml", lambda c: ["train", "--config", c.yaml("model: [unclosed\ntrain: {}\n")], 2,
     "malformed YAML at line"),
    ("yaml-not-a-mapping", lambda c: ["train", "--config", c.yaml("- 1\n- 2\n")], 2,
     "expected a mapping of sections"),
    ("unreadable-yaml", lambda c: ["train", "--config", c.a_directory("dir.yaml")], 2,
     "cannot read config: Is a directory"),
    ("set-without-value", lambda c: train(c, "--set", "train.epochs"), 2, "expected section.key=value"),
    ("bad-chaos", lambda c: train(c, "--chaos", "kill:one:3"), 2, "expected ACTION:RANK:STEP"),
    ("unknown-option", lambda c: train(c, "--epoch", "3"), 2, "No such option '--epoch'. Did you mean '--epochs'?"),
    ("unknown-device", lambda c: train(c, "--device", "tpu"), 2, "Invalid value for '--device'"),
    ("gpu-without-cupy", lambda c: train(c, "--device", "gpu"), 2, "--device gpu needs CuPy"),
    ("run-dir-holds-a-run", lambda c: train(c, run="finished"), 2,
     "already holds a run: continue it with --resume auto"),
    # ---- data files (exit 1)
    ("data-dir-missing", lambda c: train(c, "--data-dir", c.tmp / "nope"), 1, "does not exist"),
    ("idx-missing", lambda c: train(c, "--data-dir", c.damaged_data(None)), 1, f"data: lacks {LABELS}"),
    ("idx-bad-magic", lambda c: train(c, "--data-dir", c.damaged_data(lambda b: set_byte(b, 3, 3))), 1,
     f"{LABELS}: bad magic 2051: expected 2049 (labels (N,))"),
    ("idx-wrong-size", lambda c: train(c, "--data-dir", c.damaged_data(lambda b: set_byte(b, 7, 0x61))), 1,
     f"{LABELS}: truncated: header says"),
    ("idx-truncated", lambda c: train(c, "--data-dir", c.damaged_data(lambda b: b[:-100])), 1,
     f"{LABELS}: truncated: header says 60000 = 60000 bytes, file has 59900 after the header"),
    ("idx-empty", lambda c: train(c, "--data-dir", c.damaged_data(lambda b: b"")), 1, f"{LABELS}: truncated"),
    ("idx-wrong-checksum", lambda c: train(c, "--data-dir", c.damaged_data(lambda b: set_byte(b, 5000, 9))),
     1, SHA),
    ("gz-truncated", lambda c: train(c, "--data-dir", c.damaged_data(lambda b: b[:len(b) // 2], gz=True)), 1,
     f"{LABELS}.gz: bad gzip data: compressed stream is truncated"),
    ("gz-not-gzip", lambda c: train(c, "--data-dir", c.damaged_data(lambda b: b"\x1f\x8b" + bytes(64), gz=True)),
     1, f"{LABELS}.gz: bad gzip data"),
    # ---- checkpoints and run directories (exit 1)
    ("resume-other-model", lambda c: train(c, "--resume", "auto", "--set",
                                           "model.layers=[{type: flatten}, {type: linear, out: 16}, {type: relu}, "
                                           "{type: linear, out: 10}]", run="finished"), 1,
     "checkpoint step-00000016 is from a different model"),
    ("resume-past-the-end", lambda c: train(c, "--resume", "auto", "--epochs", "1", run="finished"), 1,
     "is at step 16, past this run's 8 steps: raise --epochs to continue"),
    ("resume-nothing", lambda c: train(c, "--resume", "auto"), 1, "--resume auto: no valid checkpoint in"),
    ("resume-no-such-path", lambda c: train(c, "--resume", c.tmp / "nope"), 1, "no such checkpoint directory"),
    ("run-dir-unwritable", lambda c: ["train", *BASE, "--run-dir", c.under_a_file()], 1,
     "is not writable: Not a directory"),
    ("evaluate-no-checkpoint", lambda c: ["evaluate", "--checkpoint", str(c.tmp / "nope")], 1,
     "not a checkpoint directory"),
]


@pytest.fixture
def ctx(tmp_path, data_dir, real_data_dir, reference) -> Ctx:
    return Ctx(tmp_path, data_dir, real_data_dir, reference)


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_cleanly(ddtrain, ctx, row):
    name, command, rc, message = row
    if name == "gpu-without-cupy" and importlib.util.find_spec("cupy") is not None:
        pytest.skip("CuPy is installed here: --device gpu is not a bad input")
    args = command(ctx)
    finished = ctx.tmp / "finished"
    before = snapshot(finished) if finished.exists() else None
    r = ddtrain.run(*args)
    assert r.rc == rc, r
    assert message in r.err, r
    assert "Traceback" not in r.err, r
    lines = [line for line in r.err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 or r.err.startswith("Usage:"), r  # one line, or click's usage block
    if before is not None:  # a refused command on an existing run changes nothing in it
        assert snapshot(finished) == before
    if name == "resume-nothing":  # ... and a refused start leaves nothing that blocks a new one
        assert not (ctx.tmp / "run" / "metrics.jsonl").exists()
        ddtrain.ok(ctx.tmp / "run")


@pytest.mark.mpi
def test_more_ranks_than_samples_in_a_batch(mpi, ctx):
    r = mpi.run(*train(ctx, "--batch-size", "2"), n=3)
    assert r.rc == 2, r
    assert "more ranks (3) than samples in a global batch (2): raise train.batch_size or use fewer ranks" in r.err
    assert "Traceback" not in r.err, r


@pytest.mark.parametrize("name", ["unknown-key", "idx-bad-magic", "resume-other-model"])
def test_debug_shows_the_traceback(ddtrain, ctx, name):
    _, command, rc, message = next(row for row in ROWS if row[0] == name)
    r = ddtrain.run("--debug", *command(ctx))
    assert r.rc == rc and message in r.err, r
    assert "Traceback (most recent call last)" in r.err, r
